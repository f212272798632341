# One command for the main job, one for the tests; both install what is missing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vtw-installed

.PHONY: install demo test lint train-vqa gpu-check

$(STAMP): setup.py scripts/install.sh
	./scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m vtw_vllm.demo

test: $(STAMP)
	$(PY) -m pytest -q tests --durations=15

# Everything that needs a CUDA GPU (kernel on CUDA, engine tests per attention backend,
# benchmarks), into benchmarks/results/gpu_check/; says so and exits 0 without a GPU.
gpu-check: $(STAMP)
	./scripts/gpu_check.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Re-train the shipped checkpoints/vqa-tiny (CPU, 2 threads, ~47 min here; the recipe is
# explained in vtw_vllm/quality/train.py).
TRAIN := $(PY) -m vtw_vllm.quality.train
train-vqa: $(STAMP)
	$(TRAIN) --out checkpoints/vqa-tiny --steps 5200 --full-steps 1700 --probe-weight 0.5 \
		--eval-every 650
