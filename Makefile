# Two commands do all the set-up: `make demo` and `make test` each create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-phi4mm test venv clean gpu-check gpu-check-phi4mm gpu-kit

# One pip run, which compiles nothing (--no-compile, half of its time): each module is compiled when first imported
# and kept in __pycache__. Machines that set PYTHONDONTWRITEBYTECODE (CI's does) would compile the libraries again
# in every Python process: the tests start about a hundred.
unexport PYTHONDONTWRITEBYTECODE

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile torch==2.13.0 -r requirements-dev.txt -e .
	touch $@

venv: $(VENV)/.installed

# The hateful-memes recipe end to end on CPU: full fine-tuning under DeepSpeed ZeRO-2 with two
# processes, on a tiny random checkpoint and a generated "what colour is the shape?" dataset.
DEMO_DATA := $(PY) -m phivision.synthetic demo_output/shapes --num_train 256 --text_only_every 8
DEMO_TRAIN := OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node=2 finetune_hf_trainer_hateful_memes.py \
	--dataset_name_or_path demo_output/shapes --batch_size 8 --batch_size_per_gpu 4 --num_crops 1 \
	--num_train_epochs 3 --learning_rate 3e-3 --warmup_steps 5 --max_eval_samples 48 \
	--gradient_checkpointing false --dataloader_num_workers 0 --save_steps 1000

demo: venv
	$(PY) -m phivision.tiny demo_output/tiny-phi3v --num_crops 1
	$(DEMO_DATA)
	rm -rf demo_output/run
	$(DEMO_TRAIN) --model_name_or_path demo_output/tiny-phi3v --output_dir demo_output/run

# The same on a tiny Phi-4-multimodal (transformers' own model; its shipped vision LoRA merged in first).
demo-phi4mm: venv
	$(PY) -m phivision.tiny demo_output/tiny-phi4mm --family phi4mm --num_crops 1
	$(DEMO_DATA)
	rm -rf demo_output/run-phi4mm
	$(DEMO_TRAIN) --model_name_or_path demo_output/tiny-phi4mm --output_dir demo_output/run-phi4mm

# Run first on a GPU machine: the recipe modes for a few steps at full size, then the bench, within 540 s
# (see phivision/gpu_check.py and README "On an offline GPU machine").
gpu-check: venv
	$(PY) -m phivision.gpu_check --budget 540 --out gpu_check_results

# The same for Phi-4-multimodal, a second device run of its own: its 11 GB checkpoint, Microsoft's recipe
# (--continue_vision_lora) second; no frozen-cached, zero3 or fsdp2 (the recipes refuse them for Phi-4-MM).
gpu-check-phi4mm: venv
	$(PY) -m phivision.gpu_check --family phi4mm --budget 540 --out gpu_check_results_phi4mm

# The wheels an offline GPU machine lacks, for CPython 3.12 manylinux x86_64: one with Python 3.12, a CUDA torch,
# transformers 5.17, accelerate, peft, tensorboard, matplotlib, pandas and pyarrow (no deepspeed, bitsandbytes,
# datasets or flash-attn). Packages pinned in requirements.txt take their pin from there; the others are the
# dependencies of transformers 5.23, datasets and deepspeed that such an image lacks or has too old.
# .whl/ holds what the GPU check needs, .whl/qlora/ bitsandbytes (QLoRA only: a second run, see README),
# .whl/video/ PyAV (convert_ucf101.py only). deepspeed is built here from its sdist with no ops: they JIT-compile
# with the GPU machine's nvcc (and need ninja, which is in the kit).
KIT_PINNED := transformers peft datasets
# transformers checks tokenizers, huggingface-hub, safetensors and regex versions at import; datasets needs fsspec
# <= 2026.9; deepspeed needs pydantic 2, which an image without typer's newest release may lack.
KIT_DEPS := tokenizers==0.23.3 safetensors==0.8.0 regex==2026.11.19 huggingface-hub==2.4.0 httpx2==2.16.2 \
	httpcore2==2.16.2 truststore==0.10.5 fsspec==2026.9.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
	sentencepiece==0.2.3 hjson==3.1.0 msgpack==1.2.4 py-cpuinfo==9.0.0 ninja==1.13.2 einops==0.8.2 \
	pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
KIT_DOWNLOAD := $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
pin = $(shell grep -E '^$(1)==' requirements.txt)
kit_size = $$(du -cb $(1) | tail -1 | cut -f1)

gpu-kit: venv
	rm -rf .whl && mkdir -p .whl/qlora .whl/video
	$(KIT_DOWNLOAD) -d .whl $(foreach p,$(KIT_PINNED),$(call pin,$(p))) $(KIT_DEPS)
	$(KIT_DOWNLOAD) -d .whl/qlora $(call pin,bitsandbytes)
	$(KIT_DOWNLOAD) -d .whl/video $(call pin,av)
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed -w .whl $(call pin,deepspeed)
	@repo=$(call kit_size,$$(git ls-files)); core=$(call kit_size,.whl/*.whl); \
	qlora=$(call kit_size,.whl/qlora/*.whl); video=$(call kit_size,.whl/video/*.whl); \
	mib() { echo "$$(( ($$1 + 1048575) / 1048576 )) MiB"; }; \
	echo "repository (tracked files) $$(mib $$repo); .whl/ $$(mib $$core); .whl/qlora/ $$(mib $$qlora); .whl/video/ $$(mib $$video)"; \
	echo "one run with all of them: $$(mib $$((repo + core + qlora))); so, as README says: run 1 carries .whl/" \
		"($$(mib $$((repo + core))) with the repository), run 2 .whl/qlora/ only ($$(mib $$((repo + qlora))))"

# Two pytest workers (pytest-xdist): one alone leaves a core idle while a test waits on its subprocesses. The slowest
# tests run first (tests/conftest.py) and an idle worker takes queued tests from the other (worksteal), so that both
# end together.
test: venv
	$(PY) -m pytest -q -n 2 --dist worksteal tests

clean:
	rm -rf $(VENV) demo_output
