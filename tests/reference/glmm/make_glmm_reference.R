# lme4 glmer references for jreml's GLMM fits (tests/test_glmm.py).
# Run from the repository root:  Rscript tests/reference/glmm/make_glmm_reference.R
# Writes the data sets as CSV (cbpp to jreml/datasets/, grouseticks and VerbAgg here) and glmm.json with the fits.
# Each model is fitted twice: with glmer's defaults (what a user gets) and with tightened tolerances
# (bobyqa with rhoend = 1e-12 for both stages, tolPwrss = 1e-12), so that the reference is the optimum of the
# Laplace criterion to far better than the tests' tolerances; the tests compare with the tight fit.
suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})
options(contrasts = c("contr.treatment", "contr.poly"))
here <- file.path("tests", "reference", "glmm")

data(cbpp, package = "lme4")
write.csv(data.frame(herd = as.character(cbpp$herd), incidence = cbpp$incidence, size = cbpp$size,
                     period = as.character(cbpp$period)),
          file.path("jreml", "datasets", "cbpp.csv"), row.names = FALSE, quote = FALSE)
data(grouseticks, package = "lme4")
write.csv(data.frame(INDEX = as.character(grouseticks$INDEX), TICKS = grouseticks$TICKS,
                     BROOD = as.character(grouseticks$BROOD), HEIGHT = grouseticks$HEIGHT,
                     YEAR = as.character(grouseticks$YEAR), LOCATION = as.character(grouseticks$LOCATION)),
          file.path(here, "grouseticks.csv"), row.names = FALSE, quote = FALSE)
data(VerbAgg, package = "lme4")
write.csv(data.frame(Anger = VerbAgg$Anger, Gender = as.character(VerbAgg$Gender), item = as.character(VerbAgg$item),
                     id = as.character(VerbAgg$id), btype = as.character(VerbAgg$btype),
                     situ = as.character(VerbAgg$situ), mode = as.character(VerbAgg$mode),
                     r2 = as.integer(VerbAgg$r2 == "Y")),
          file.path(here, "VerbAgg.csv"), row.names = FALSE, quote = FALSE)

# Read the CSVs back (factors with sorted string levels, as jreml builds them).
read <- function(path, factors) {
  d <- read.csv(path, stringsAsFactors = FALSE)
  for (f in factors) d[[f]] <- factor(as.character(d[[f]]), levels = sort(unique(as.character(d[[f]]))))
  d
}
cb <- read(file.path("jreml", "datasets", "cbpp.csv"), c("herd", "period"))
gt <- read(file.path(here, "grouseticks.csv"), c("INDEX", "BROOD", "YEAR", "LOCATION"))
gt$HEIGHT <- as.numeric(scale(gt$HEIGHT))  # centred and divided by its SD (n - 1), as in lme4's example
va <- read(file.path(here, "VerbAgg.csv"), c("Gender", "item", "id", "btype", "situ", "mode"))

models <- list(
  cbpp = list(formula = cbind(incidence, size - incidence) ~ period + (1 | herd), data = cb, family = binomial),
  grouseticks = list(formula = TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION), data = gt,
                     family = poisson),
  verbagg = list(formula = r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), data = va, family = binomial)
)
tight <- glmerControl(optimizer = c("bobyqa", "bobyqa"), tolPwrss = 1e-12,
                      optCtrl = list(rhoend = 1e-12, maxfun = 1e5), check.conv.grad = "ignore")

describe <- function(m, seconds) {
  vc <- as.data.frame(VarCorr(m))
  s <- summary(m)
  co <- coef(s)
  re <- ranef(m, condVar = TRUE)
  list(
    formula = paste(deparse(formula(m), width.cutoff = 500), collapse = ""),
    nobs = nobs(m),
    objective = unname(m@devcomp$cmp[["dev"]]),
    logLik = as.numeric(logLik(m)), deviance_m2ll = -2 * as.numeric(logLik(m)),
    deviance_lme4 = deviance(m), AIC = AIC(m), BIC = BIC(m), df_resid = df.residual(m),
    theta = unname(getME(m, "theta")),
    fixef = as.list(fixef(m)),
    se = as.list(setNames(co[, "Std. Error"], rownames(co))),
    z = as.list(setNames(co[, "z value"], rownames(co))),
    p = as.list(setNames(co[, "Pr(>|z|)"], rownames(co))),
    varcomp = setNames(lapply(seq_len(nrow(vc)), function(i) list(group = vc$grp[i], variance = vc$vcov[i],
                                                                   sd = vc$sdcor[i])), vc$grp),
    ranef = lapply(re, function(r) list(level = rownames(r), mode = r[[1]],
                                        sd = sqrt(as.numeric(attr(r, "postVar"))))),
    eta_head = unname(head(predict(m, type = "link"), 10)),
    mu_head = unname(head(predict(m, type = "response"), 10)),
    seconds = seconds
  )
}
out <- list(
  note = paste("lme4 glmer (Laplace, nAGQ = 1) fits; 'tight' with bobyqa rhoend = 1e-12 and tolPwrss = 1e-12",
               "for both stages, 'default' with glmerControl() defaults. objective = devcomp$cmp['dev'] =",
               "-2 log p(y | mu) + ||u||^2 + log|L|^2 (= deviance_m2ll = -2 logLik). Made by",
               "tests/reference/glmm/make_glmm_reference.R. grouseticks HEIGHT = scale(HEIGHT)."),
  software = list(R = R.version.string, lme4 = as.character(packageVersion("lme4"))),
  fits = list()
)
for (name in names(models)) {
  spec <- models[[name]]
  t0 <- proc.time()[["elapsed"]]
  default <- glmer(spec$formula, data = spec$data, family = spec$family)
  t1 <- proc.time()[["elapsed"]]
  fit <- glmer(spec$formula, data = spec$data, family = spec$family, control = tight)
  t2 <- proc.time()[["elapsed"]]
  out$fits[[name]] <- list(tight = describe(fit, t2 - t1), default = describe(default, t1 - t0))
  cat(name, "objective tight", fit@devcomp$cmp[["dev"]], "default", default@devcomp$cmp[["dev"]], "\n")
}
# cbpp at nAGQ = 25 (adaptive Gauss-Hermite, one scalar term)
fit25 <- glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), data = cb, family = binomial, nAGQ = 25,
               control = tight)
out$fits[["cbpp_agq25"]] <- list(tight = describe(fit25, NA))
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), file.path(here, "glmm.json"))
