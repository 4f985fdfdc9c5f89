# Reference fits for singular_slopes3.json: run in tests/reference with R and lme4 (1.1-31 here); lme4.json was then
# folded into singular_slopes3.json.
suppressMessages(library(lme4)); library(jsonlite)
d <- read.csv("singular_slopes3.csv"); d$g <- factor(d$g)
res <- list()
for (j in 0:59) {
  fm <- as.formula(paste0("y", j, " ~ x1 + x2 + (x1 + x2 | g)"))
  f1 <- suppressWarnings(suppressMessages(lmer(fm, d, REML = TRUE)))
  f <- suppressWarnings(suppressMessages(lmer(fm, d, REML = TRUE,
         control = lmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5)))))
  if (as.numeric(logLik(f1)) > as.numeric(logLik(f))) f <- f1
  res[[paste0("y", j)]] <- list(loglik = as.numeric(logLik(f)), singular = isSingular(f))
}
write_json(res, "lme4.json", digits = NA, auto_unbox = TRUE)
