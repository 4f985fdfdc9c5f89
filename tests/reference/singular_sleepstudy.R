# Reference fits for singular_sleepstudy.json: run in tests/reference with R and lme4 (1.1-31 here), then
# lme4_fits.json was folded into singular_sleepstudy.json (plus the simulated kind of each response).
suppressMessages(library(lme4)); library(jsonlite)
d <- read.csv("singular_sleepstudy.csv"); d$Subject <- factor(d$Subject)
res <- list()
for (j in 0:59) {
  f1 <- suppressMessages(lmer(as.formula(paste0("y", j, " ~ Days + (Days | Subject)")), d, REML = TRUE))
  f <- suppressMessages(lmer(as.formula(paste0("y", j, " ~ Days + (Days | Subject)")), d, REML = TRUE,
       control = lmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))))
  if (as.numeric(logLik(f1)) > as.numeric(logLik(f))) f <- f1
  vc <- as.data.frame(VarCorr(f))
  res[[paste0("y", j)]] <- list(loglik = as.numeric(logLik(f)), vcov = vc$vcov, grp = vc$grp, var1 = vc$var1, var2 = vc$var2,
                                 beta = unname(fixef(f)), singular = isSingular(f))
}
write_json(list(lme4_version = as.character(packageVersion("lme4")), R_version = R.version.string, fits = res), "lme4_fits.json", digits = NA, auto_unbox = TRUE)
