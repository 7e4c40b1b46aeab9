# Two commands do all the set-up: `make demo` and `make test` each create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv clean gpu-check

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# The hateful-memes recipe end to end on CPU: full fine-tuning under DeepSpeed ZeRO-2 with two
# processes, on a tiny random checkpoint and a generated "what colour is the shape?" dataset.
demo: venv
	$(PY) -m phi3v.tiny demo_output/tiny-phi3v --num_crops 1
	$(PY) -m phi3v.synthetic demo_output/shapes --num_train 256 --text_only_every 8
	rm -rf demo_output/run
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node=2 finetune_hf_trainer_hateful_memes.py \
		--model_name_or_path demo_output/tiny-phi3v --dataset_name_or_path demo_output/shapes \
		--output_dir demo_output/run --batch_size 8 --batch_size_per_gpu 4 --num_crops 1 \
		--num_train_epochs 3 --learning_rate 3e-3 --warmup_steps 5 --max_eval_samples 48 \
		--gradient_checkpointing false --dataloader_num_workers 0 --save_steps 1000

# Run first on a GPU machine: every recipe mode for a few steps at full size, then the bench (see phi3v/gpu_check.py).
gpu-check: venv
	$(PY) -m phi3v.gpu_check

# Two pytest workers (pytest-xdist): one alone leaves a core idle while a test waits on its subprocesses.
test: venv
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) demo_output
