# lmerTest / pbkrtest reference for jreml's coef_table(ddf=...) and anova(ddf=...) (tests/test_inference_ddf.py).
# Run from the repository root:  Rscript tests/reference/make_ddf_reference.R
# Data: jreml's bundled CSVs (jreml/datasets/), factors with sorted levels, treatment contrasts, REML fits.
suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(pbkrtest)
  library(jsonlite)
})
options(contrasts = c("contr.treatment", "contr.poly"))
read <- function(name, factors) {
  d <- read.csv(file.path("jreml", "datasets", name), stringsAsFactors = FALSE)
  for (f in factors) d[[f]] <- factor(as.character(d[[f]]), levels = sort(unique(as.character(d[[f]]))))
  d
}
models <- list(
  sleepstudy = list(Reaction ~ Days + (Days | Subject), read("sleepstudy.csv", "Subject")),
  penicillin = list(diameter ~ 1 + (1 | plate) + (1 | sample), read("Penicillin.csv", c("plate", "sample"))),
  machines = list(score ~ Machine + (1 | Worker) + (1 | Worker:Machine), read("Machines.csv", c("Worker", "Machine"))),
  dyestuff = list(Yield ~ 1 + (1 | Batch), read("Dyestuff.csv", "Batch"))
)
coef_rows <- function(tab) {
  lapply(seq_len(nrow(tab)), function(i) list(
    name = rownames(tab)[i], estimate = tab[i, "Estimate"], se = tab[i, "Std. Error"],
    df = tab[i, "df"], t = tab[i, "t value"], p = tab[i, "Pr(>|t|)"]
  ))
}
anova_rows <- function(tab) {
  lapply(seq_len(nrow(tab)), function(i) list(
    term = rownames(tab)[i], sum_sq = tab[i, "Sum Sq"], mean_sq = tab[i, "Mean Sq"], num_df = tab[i, "NumDF"],
    den_df = tab[i, "DenDF"], f = tab[i, "F value"], p = tab[i, "Pr(>F)"]
  ))
}
out <- list(
  note = paste(
    "lmerTest::lmer (REML) fits of jreml's bundled data; coef tables from summary(fit, ddf=...),",
    "anova tables from anova(fit, type=3, ddf=...). Made by tests/reference/make_ddf_reference.R."
  ),
  software = list(
    R = R.version.string, lme4 = as.character(packageVersion("lme4")),
    lmerTest = as.character(packageVersion("lmerTest")), pbkrtest = as.character(packageVersion("pbkrtest"))
  )
)
for (name in names(models)) {
  fit <- lmerTest::lmer(models[[name]][[1]], data = models[[name]][[2]], REML = TRUE)
  entry <- list(
    formula = paste(deparse(models[[name]][[1]]), collapse = ""),
    satterthwaite = coef_rows(coef(summary(fit, ddf = "Satterthwaite"))),
    kenward_roger = coef_rows(coef(summary(fit, ddf = "Kenward-Roger")))
  )
  if (length(attr(terms(fit), "term.labels")) > 0) {
    entry$anova_satterthwaite <- anova_rows(anova(fit, type = 3, ddf = "Satterthwaite"))
    entry$anova_kenward_roger <- anova_rows(anova(fit, type = 3, ddf = "Kenward-Roger"))
  }
  out[[name]] <- entry
}
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), file.path("tests", "reference", "ddf.json"))
