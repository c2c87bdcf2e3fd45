# Two commands for a newcomer: `make demo` and `make test`. Both create/reuse .venv.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARTIFACTS ?= artifacts
PYTEST_ARGS ?= --durations=25

.PHONY: setup demo test lint bench-data bench-train bench-serve tune-tiny clean

setup: $(STAMP)

# torch==2.13.0 first: a CPU build lies on this disk; letting pip resolve `torch`
# on its own would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# MovieLens-100K with a generated query per event (data/queries.py) -> prepared data -> the
# `cpu-search` preset (the real MiniLM item-token retriever, one checkpoint for /v1/recommend and
# /v1/search, ~12 min on 2 cores) -> the best checkpoint copied to artifacts/models/retriever (what
# serve_configs/local.yaml serves, with this data's users on its /demo page) -> test-split
# evaluation of recommendation against popularity, EASE and the sequential Markov and SASRec (one
# SASRec seed here, a few minutes; docs/quality.md reports three) (artifacts/eval/report.md), then
# the search table (BM25, zero-shot, query-filtered popularity, the model with and without the
# user; artifacts/eval-search/report.md); each evaluation prints its table as it ends.
# Re-running trains again under a new run name; DEMO_RUN=cpu-search resumes/extends the same run.
DEMO_RUN ?= cpu-search-$(shell date +%Y%m%d-%H%M%S)
demo: $(STAMP)
	$(BIN)/python jobs/prepare_data.py --dataset movielens-100k --output $(ARTIFACTS)/ml-100k-q --set queries=metadata
	$(BIN)/python jobs/train.py --config configs/cpu-search.yaml --set data=$(ARTIFACTS)/ml-100k-q --set name=$(DEMO_RUN) > $(ARTIFACTS)/demo-train.json
	$(BIN)/python -m recsys_ray.train.report $(ARTIFACTS)/demo-train.json
	rm -rf $(ARTIFACTS)/models/retriever && mkdir -p $(ARTIFACTS)/models
	cp -r "$$($(BIN)/python -m recsys_ray.train.report --best-checkpoint $(ARTIFACTS)/demo-train.json)" $(ARTIFACTS)/models/retriever
	@echo "evaluating on the test split; report: $(ARTIFACTS)/eval/report.md (plots next to it); serve it: serve run serve_configs/local.yaml, then open http://127.0.0.1:8000/demo"
	$(BIN)/python jobs/evaluate.py --data $(ARTIFACTS)/ml-100k-q --checkpoint $(ARTIFACTS)/models/retriever --sasrec-seeds 1 --output $(ARTIFACTS)/eval > $(ARTIFACTS)/demo-eval.json
	$(BIN)/python jobs/evaluate.py --task search --data $(ARTIFACTS)/ml-100k-q --checkpoint $(ARTIFACTS)/models/retriever --output $(ARTIFACTS)/eval-search > $(ARTIFACTS)/demo-eval-search.json

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check recsys_ray jobs tests

bench-data: $(STAMP)
	$(BIN)/python jobs/bench_data.py --set "sizes=[1000000, 10000000]" --set output=$(ARTIFACTS)/bench_data

bench-train: $(STAMP)
	$(BIN)/python jobs/bench_train.py --set data=$(ARTIFACTS)/ml-100k --set model=minilm --set output=$(ARTIFACTS)/bench_train

# A 12-trial Ray Tune sweep of the tiny preset (minutes); report in $(ARTIFACTS)/tune/<name>/report/.
TUNE_NAME ?= tune-tiny-$(shell date +%Y%m%d-%H%M%S)
tune-tiny: $(STAMP)
	test -f $(ARTIFACTS)/syn-tiny/manifest.json || $(BIN)/python jobs/prepare_data.py --dataset synthetic --output $(ARTIFACTS)/syn-tiny --set synthetic.num_users=200 --set synthetic.num_items=300 --set synthetic.num_events=4000
	$(BIN)/python jobs/tune.py --config configs/tune-tiny.yaml --set train.data=$(ARTIFACTS)/syn-tiny --set tune.storage_path=$(ARTIFACTS)/tune --set tune.name=$(TUNE_NAME)

clean:
	rm -rf $(ARTIFACTS) .pytest_cache
