# ftcourse: two entry points, `make book` and `make test`. Both build the environment first.
#
#   make env    create .venv (if missing) and install ftcourse with the pinned CPU stack, and Debian's
#               chromium (browser and PDF tests) and BibTeX (citation test) when missing (apt-get, needs
#               root; without root, outside CI, it warns and those tests skip by name)
#   make book   build the HTML book into _build/html (chapters run unless their outputs are cached), then
#               lay it out as the published site in _build/site (v<version>/, latest/, versions.json)
#   make test   everything CI checks, in order: lint and format; unit tests and every chapter under
#               nbmake (each passing chapter is stored in the execution cache); every chapter again
#               under the spark profile on local stand-ins (spark-chapters); the site build with
#               -W -n, which reuses the cpu outputs; the browser test of the built site
#   make spark-chapters   the spark profile's code path on CPU: every chapter with a tiny
#               Llama-3.1-shaped model and hub-shaped datasets (ftcourse.toy.standin), minimal sizes
#   make pdf    the whole book as one PDF, _build/pdf/ftcourse.pdf: Sphinx's single-page HTML (reusing the
#               executed chapters) printed by the browser test's Chromium; `make test` prints and tests it
#   make freeze re-pin constraints-cpu.txt from the current .venv
#
# The environment is rebuilt only when pyproject.toml or constraints-cpu.txt change (stamp file).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ftcourse-env.stamp
TORCH_VERSION := 2.13.0
CONSTRAINTS := constraints-cpu.txt
CHROMIUM := /usr/bin/chromium
BIBTEX := /usr/bin/bibtex
# llama.cpp's own converters (convert_lora_to_gguf.py and what it imports) from the source distribution of
# the installed llama-cpp-python: tests/test_gguf_lora.py checks our GGUF LoRA writer against them.
LLAMA_CPP_SRC := $(VENV)/llama.cpp-src
SITE_TEST := tests/test_site.py
PDF_TEST := tests/test_pdf.py
SPARK_TEST := tests/test_spark_path.py
# Under the stand-ins a chapter is a smoke test: 40 s each on the design machine, scaled to this CPU's
# speed like the chapters' 90 s (conftest.py); over 3 x the scaled budget fails.
SPARK_CHAPTER_BUDGET_S ?= 40

# Chapters start kernels with the venv's Python and call its tools; put it first on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: env book site test lint chapters spark-chapters site-test pdf pdf-test freeze clean

env: $(STAMP) $(CHROMIUM) $(BIBTEX) $(LLAMA_CPP_SRC)/convert_lora_to_gguf.py

# The converters of the llama.cpp that llama-cpp-python vendors, same version as installed (~75 MB sdist,
# fetched once per environment; only four paths are kept).
$(LLAMA_CPP_SRC)/convert_lora_to_gguf.py: $(STAMP)
	@echo "Fetching llama.cpp's converters from llama-cpp-python's source distribution..."
	version="$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))")"; \
	tmp="$$(mktemp -d)"; trap 'rm -rf "$$tmp"' EXIT; \
	$(BIN)/python -m pip download --quiet --progress-bar off --no-deps --no-binary :all: \
	  "llama-cpp-python==$$version" -d "$$tmp"; \
	rm -rf $(LLAMA_CPP_SRC).partial; mkdir -p $(LLAMA_CPP_SRC).partial; \
	tar -xzf "$$tmp"/llama_cpp_python-*.tar.gz -C $(LLAMA_CPP_SRC).partial --strip-components=3 --wildcards \
	  '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/convert_lora_to_gguf.py' \
	  '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'; \
	rm -rf $(LLAMA_CPP_SRC); mv $(LLAMA_CPP_SRC).partial $(LLAMA_CPP_SRC)
	@touch $@  # tar keeps the release's old mtime: without this, every make would fetch again

# System tools from Debian (CI machines start without them): Chromium drives the browser and PDF tests
# (Playwright never downloads one); BibTeX compiles the book's citation with the standard styles
# (tests/test_site_build.py). Installing needs root. Without root, outside CI, the set-up warns and goes
# on: the tests that need the tool skip with a named reason. In CI (CI set) a missing tool is an error.
define apt_install
	@if [ "$$(id -u)" -ne 0 ]; then \
	  if [ -n "$${CI:-}" ]; then echo "$(1) is missing and installing it needs root: sudo apt-get install -y $(2)" >&2; exit 1; fi; \
	  echo "warning: $(1) is missing (sudo apt-get install -y $(2)); the tests that need it will skip" >&2; \
	else \
	  echo "Installing Debian's $(2) ($(1))..."; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(2); \
	fi
endef

$(CHROMIUM):
	$(call apt_install,Chromium for the browser test,chromium)

$(BIBTEX):
	$(call apt_install,BibTeX for the citation test,texlive-binaries texlive-base)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@echo "Setting up $(VENV) (a few minutes on a fresh machine)..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet --progress-bar off "torch==$(TORCH_VERSION)"
	@# llama-cpp-python has no wheel for this machine: pip builds it (4-10 min once, then its wheel cache).
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" \
	  $(BIN)/python -m pip install --quiet --progress-bar off -e ".[book,test,deploy]" -c $(CONSTRAINTS)
	@touch $@

# The HTML book, then the published layout (`site`): `make book` is what the publish workflow deploys.
# Needs no root: the environment only (Chromium is for the browser and PDF tests).
book: $(STAMP)
	$(BIN)/jupyter-book build --all -W -n --keep-going .
	$(MAKE) --no-print-directory site
	@echo "Open _build/html/index.html (the site as published: _build/site, one folder per version)"

# The published layout, from the HTML build (no second build): _build/html copied into _build/site as
# v<version>/ (version from pyproject.toml) and latest/, with versions.json for the version switcher and a
# root index.html that leads to latest/. Versions already in _build/site stay (the publish workflow puts
# the published ones there first), so older releases remain reachable.
site: $(STAMP)
	$(BIN)/python book/_ext/ftcourse_book.py site

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Unit tests, then every chapter of _toc.yml (conftest.py); prints each chapter's time and the total.
# (The spark-path unit tests run once, in spark-chapters.)
chapters: env
	FTCOURSE_LLAMA_CPP_SRC=$(CURDIR)/$(LLAMA_CPP_SRC) \
	  $(BIN)/pytest --ignore=$(SITE_TEST) --ignore=$(SPARK_TEST) --ignore=$(PDF_TEST)

# The spark profile offline: the stand-ins' environment (FTCOURSE_PROFILE=spark, FTCOURSE_DEVICE=cpu,
# FTCOURSE_MODEL, FTCOURSE_DATASETS, FTCOURSE_SIZES=minimal, HF offline), then the spark-path unit tests
# and every chapter. Nothing enters the book's execution cache; the summary lists each chapter's skips.
spark-chapters: env
	standin_env="$$($(BIN)/python -m ftcourse.toy.standin)"; eval "$$standin_env"; \
	FTCOURSE_EXECUTION_CACHE=0 FTCOURSE_CHAPTER_BUDGET_S=$(SPARK_CHAPTER_BUDGET_S) \
	  $(BIN)/pytest -p no:cacheprovider $(SPARK_TEST) book

# The browser test of the built site (make book first). CI=true: it fails, never skips, without a site.
site-test: env
	CI=$${CI:-true} $(BIN)/pytest -p no:cacheprovider $(SITE_TEST)

# The PDF: the single-page build reuses the html build's doctrees and executed chapters (run nothing
# new when `make book` ran first), then Chromium prints it once MathJax has typeset every formula.
pdf: env $(CHROMIUM)
	$(BIN)/jupyter-book build --builder singlehtml -W -n --keep-going .
	$(BIN)/python book/_ext/ftcourse_book.py pdf _build/singlehtml _build/pdf/ftcourse.pdf

# The PDF's test (make pdf first). CI=true: it fails, never skips, without a PDF.
pdf-test: env
	CI=$${CI:-true} $(BIN)/pytest -p no:cacheprovider $(PDF_TEST)

# In this order: a chapter runs once, under nbmake; the build renders its cached outputs.
test: lint
	$(MAKE) --no-print-directory chapters
	$(MAKE) --no-print-directory spark-chapters
	$(MAKE) --no-print-directory book
	@# Without Chromium (a set-up without root, outside CI) the browser and PDF steps are skipped by name.
	@if [ -x $(CHROMIUM) ] || [ -n "$${CI:-}" ]; then \
	  $(MAKE) --no-print-directory site-test pdf pdf-test; \
	else echo "SKIPPED: the browser test of the site and the PDF: no Chromium (sudo apt-get install -y chromium)"; fi

# Re-pin the known-good stack after a dependency change (then commit constraints-cpu.txt).
freeze: env
	@{ sed -n '1,/^# torch/p' $(CONSTRAINTS); \
	   $(BIN)/python -m pip freeze --all --exclude-editable \
	   | grep -viE '^(pip|setuptools|wheel|ftcourse)([=@ ]|$$)'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@touch $(STAMP)

clean:
	rm -rf _build .pytest_cache .ruff_cache
	rm -f book/api/ftcourse*.md
	find book -name '.*.nbmake.ipynb' -delete
