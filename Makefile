# senseflow-composer. `make test` and `make demo` install what they need first.
PYTHON ?= python
PIP_STAMP := .install.stamp

.PHONY: install test test-slow lint demo clean

$(PIP_STAMP): pyproject.toml
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	@touch $(PIP_STAMP)

install: $(PIP_STAMP)

test: install
	$(PYTHON) -m pytest tests -q

test-slow: install
	$(PYTHON) -m pytest tests -q -m slow

lint: install
	$(PYTHON) -m ruff check senseflow_algos tests bench data_prep train.py export.py eval.py

demo: install
	composer train.py yamls/shapes.yaml

clean:
	rm -rf runs $(PIP_STAMP) .pytest_cache
