"""Statistical genetics: relationship matrices from genotypes (``grm``) and pedigrees (``pedigree_matrix``)."""
