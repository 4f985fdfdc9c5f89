# pbkrtest / lmerTest reference for jreml's Kenward-Roger tests (tests/test_inference_ddf.py, test_kr_*).
# Run from the repository root:  Rscript tests/reference/kenward_roger.R
# Writes tests/reference/kenward_roger.json and the simulated data tests/reference/kr_unbalanced.csv (seed 17).
#
# Data: sleepstudy, Machines, a simulated unbalanced design, and response y2 of singular_sleepstudy.csv (a singular
# fit). Per data set (REML fits, treatment contrasts, factor levels sorted):
#   - KRmodcomp(full, full without one term) for each fixed-effect term: pbkrtest's scaled F, ndf, ddf,
#     F.scaling and p, and the unscaled F (Halekoh & Hojsgaard 2014, Kenward & Roger 1997);
#   - per-coefficient t-tests from lmerTest's summary(fit, ddf = "Kenward-Roger") and ddf = "Satterthwaite".
suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(pbkrtest)
  library(jsonlite)
})
options(contrasts = c("contr.treatment", "contr.poly"))
ref_dir <- file.path("tests", "reference")
as_factors <- function(d, factors) {
  for (f in factors) d[[f]] <- factor(as.character(d[[f]]), levels = sort(unique(as.character(d[[f]]))))
  d
}
bundled <- function(name, factors) {
  as_factors(read.csv(file.path("jreml", "datasets", name), stringsAsFactors = FALSE), factors)
}

# An unbalanced design: 12 groups of 3..15 rows, a crossed 6-level factor, a random slope, a 3-level treatment.
set.seed(17)
sizes <- sample(3:15, 12, replace = TRUE)
g <- rep(sprintf("g%02d", seq_along(sizes)), sizes)
n <- length(g)
h <- sample(sprintf("h%d", 1:6), n, replace = TRUE)
x <- round(rnorm(n), 4)
trt <- sample(c("a", "b", "c"), n, replace = TRUE)
b0 <- rnorm(12, sd = 1.0)
b1 <- rnorm(12, sd = 0.6)
ch <- rnorm(6, sd = 0.7)
gi <- match(g, sprintf("g%02d", seq_along(sizes)))
hi <- match(h, sprintf("h%d", 1:6))
y <- 2 + 0.4 * x + c(a = 0, b = 0.5, c = -0.3)[trt] + b0[gi] + b1[gi] * x + ch[hi] + rnorm(n, sd = 0.8)
sim <- data.frame(y = round(y, 4), x = x, trt = trt, g = g, h = h)
write.csv(sim, file.path(ref_dir, "kr_unbalanced.csv"), row.names = FALSE)
sim <- as_factors(read.csv(file.path(ref_dir, "kr_unbalanced.csv"), stringsAsFactors = FALSE), c("trt", "g", "h"))

models <- list(
  sleepstudy = list(Reaction ~ Days + (Days | Subject), bundled("sleepstudy.csv", "Subject"), "sleepstudy.csv"),
  machines = list(
    score ~ Machine + (1 | Worker) + (1 | Worker:Machine), bundled("Machines.csv", c("Worker", "Machine")),
    "Machines.csv"
  ),
  kr_unbalanced = list(y ~ x + trt + (1 + x | g) + (1 | h), sim, "tests/reference/kr_unbalanced.csv"),
  # a singular fit (correlation -1): pbkrtest keeps every variance parameter (V linear in them)
  singular_sleepstudy = list(
    y2 ~ Days + (Days | Subject),
    as_factors(read.csv(file.path(ref_dir, "singular_sleepstudy.csv")), "Subject"),
    "tests/reference/singular_sleepstudy.csv"
  )
)
coef_rows <- function(tab) {
  lapply(seq_len(nrow(tab)), function(i) list(
    name = rownames(tab)[i], estimate = tab[i, "Estimate"], se = tab[i, "Std. Error"],
    df = tab[i, "df"], t = tab[i, "t value"], p = tab[i, "Pr(>|t|)"]
  ))
}
out <- list(
  note = paste(
    "pbkrtest::KRmodcomp(full, full minus one term) per fixed-effect term and lmerTest summary(fit, ddf=...)",
    "coefficient tables, REML fits. Made by tests/reference/kenward_roger.R."
  ),
  software = list(
    R = R.version.string, lme4 = as.character(packageVersion("lme4")),
    lmerTest = as.character(packageVersion("lmerTest")), pbkrtest = as.character(packageVersion("pbkrtest"))
  )
)
for (name in names(models)) {
  form <- models[[name]][[1]]
  data <- models[[name]][[2]]
  fit <- lmerTest::lmer(form, data = data, REML = TRUE)
  tests <- list()
  for (term in attr(terms(nobars(form)), "term.labels")) {
    small <- update(fit, paste(". ~ . -", term))
    kr <- KRmodcomp(as(fit, "lmerMod"), as(small, "lmerMod"))$stats
    tests[[length(tests) + 1]] <- list(
      term = term, f = kr$Fstat, ndf = kr$ndf, ddf = kr$ddf, f_scaling = kr$F.scaling, p = kr$p.value,
      f_unscaled = kr$FstatU
    )
  }
  out[[name]] <- list(
    formula = paste(deparse(form), collapse = ""),
    data = models[[name]][[3]],
    loglik = as.numeric(logLik(fit)),
    singular = isSingular(fit),
    krmodcomp = tests,
    kenward_roger = coef_rows(coef(summary(fit, ddf = "Kenward-Roger"))),
    satterthwaite = coef_rows(coef(summary(fit, ddf = "Satterthwaite")))
  )
}
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), file.path(ref_dir, "kenward_roger.json"))
