# One command for the main job, one for the tests; both install what is missing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vtw-installed

.PHONY: install demo test lint train-vqa

$(STAMP): setup.py scripts/install.sh
	./scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m vtw_vllm.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Re-train the shipped checkpoints/vqa-tiny (CPU, 2 threads, ~55 min here; the stages are
# explained in vtw_vllm/quality/train.py).
TRAIN := $(PY) -m vtw_vllm.quality.train
train-vqa: $(STAMP)
	$(TRAIN) --out out/vqa-stage-a
	$(TRAIN) --init-from out/vqa-stage-a --data-start 100000 --steps 3600 --full-steps 500 \
		--warmup 50 --eval-every 300 --vision-steps 0 --out out/vqa-stage-b
	$(TRAIN) --init-from out/vqa-stage-b --data-start 200000 --steps 700 --full-steps 700 \
		--warmup 30 --lr 5e-4 --eval-every 350 --vision-steps 0 --out out/vqa-stage-c
	$(TRAIN) --init-from out/vqa-stage-c --data-start 300000 --steps 800 --full-steps 800 \
		--warmup 30 --lr 5e-4 --eval-every 400 --vision-steps 0 --out checkpoints/vqa-tiny
