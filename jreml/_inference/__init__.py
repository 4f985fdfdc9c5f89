"""Small-sample inference on fixed effects: Satterthwaite and Kenward–Roger t- and F-tests (see :mod:`.ddf`)."""

from .ddf import DDF_METHODS, anova_table, check_ddf, coef_table

__all__ = ["DDF_METHODS", "anova_table", "check_ddf", "coef_table"]
