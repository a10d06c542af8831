# senseflow-composer. `make test` and `make demo` install what they need first.
PYTHON ?= python
PIP_STAMP := .install.stamp

.PHONY: install test test-slow lint demo demo-2step clean

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

# The same distillation into a 2-step student (runs/shapes_2step), its report beside the 4-step one of `make demo`.
demo-2step: install
	composer train.py yamls/shapes.yaml model.num_steps=2 run_name=shapes_2step
	@if [ -f runs/shapes/shapes_report/report.json ]; then $(PYTHON) -m senseflow_algos.shapes.report --compare \
		runs/shapes/shapes_report/report.json runs/shapes_2step/shapes_report/report.json; fi

clean:
	rm -rf runs $(PIP_STAMP) .pytest_cache
