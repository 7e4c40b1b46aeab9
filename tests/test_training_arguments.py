"""phivision.training.arguments: every TrainingArguments flag, the guide's flags and defaults, one-line flag errors."""

from dataclasses import dataclass, field

import pytest
from test_recipes import ROOT

from phivision.training.arguments import DEFAULT_DEEPSPEED_CONFIG, RecipeTrainingArguments, deepspeed_config, parse_args


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)


def parse(tmp_path, *argv, **defaults):
    return parse_args(argv=["--output_dir", str(tmp_path / "out"), "--deepspeed", "none", *argv], **defaults)


def test_trainer_only_flags_work_with_their_usual_meaning(tmp_path):
    args = parse(tmp_path, "--optim", "adamw_torch_fused", "--eval_strategy", "steps", "--eval_steps", "5",
                 "--save_only_model", "--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", '{"num_cycles": 0.5}',
                 "--torch_compile", "--hub_model_id", "me/phi3v-memes", "--logging_first_step", "--max_steps", "7")
    training = args.training
    assert isinstance(training, RecipeTrainingArguments)
    assert training.optim == "adamw_torch_fused" and training.eval_strategy == "steps" and training.eval_steps == 5
    assert training.save_only_model and training.torch_compile and training.logging_first_step
    assert training.lr_scheduler_type == "cosine" and training.lr_scheduler_kwargs == {"num_cycles": 0.5}
    assert training.hub_model_id == "me/phi3v-memes" and training.max_steps == 7


def test_every_guide_flag(tmp_path):
    args = parse(tmp_path, "--batch_size", "64", "--batch_size_per_gpu", "4", "--wd", "0.1", "--bf16",
                 "--use_flash_attention", "--use_qlora", "--freeze_vision_model", "--lora_rank", "8",
                 "--lora_alpha_ratio", "4", "--lora_dropout", "0.05", "--num_crops", "4", "--no-tqdm",
                 "--learning_rate", "1e-5", "--num_train_epochs", "3", "--max_seq_length", "2048",
                 "--dataset_name_or_path", "data/", "--model_name_or_path", "local/phi", "--packing",
                 "--max_eval_samples", "10", "--eval_batch_size", "2", "--max_new_tokens", "8", "--skip_eval_before",
                 "--no_gradient_checkpointing", "--no_auto_resume")
    training, model, lora, data = args.training, args.model, args.lora, args.data
    assert (training.batch_size, training.per_device_train_batch_size, training.gradient_accumulation_steps) == (64, 4, 16)
    assert training.weight_decay == 0.1 and training.bf16 and not training.fp16 and training.disable_tqdm
    assert training.learning_rate == 1e-5 and training.num_train_epochs == 3 and training.per_device_eval_batch_size == 2
    assert training.activation_checkpointing is False and training.no_auto_resume
    assert training.train_sampling_strategy == "random"  # packing: no length grouping
    assert (model.model_name_or_path, model.num_crops, model.use_flash_attention, model.freeze_vision_model) == (
        "local/phi", 4, True, True)
    assert (lora.use_lora, lora.use_qlora, lora.lora_rank, lora.lora_alpha_ratio, lora.lora_dropout) == (
        True, True, 8, 4, 0.05)  # --use_qlora implies --use_lora
    assert (data.dataset_name_or_path, data.max_seq_length, data.packing, data.max_eval_samples) == (
        "data/", 2048, True, 10)
    assert data.max_new_tokens == 8 and data.skip_eval_before
    assert parse(tmp_path, "--no_tqdm").training.disable_tqdm
    assert parse(tmp_path, "--gradient_checkpointing", "false").training.activation_checkpointing is False


def test_the_guides_defaults(tmp_path):
    args = parse(tmp_path)
    training = args.training
    assert (training.batch_size, training.per_device_train_batch_size, training.gradient_accumulation_steps) == (16, 1, 16)
    assert (training.learning_rate, training.weight_decay, training.adam_beta1, training.adam_beta2,
            training.adam_epsilon, training.max_grad_norm) == (4e-5, 0.01, 0.9, 0.95, 1e-7, 1.0)
    assert training.lr_scheduler_type == "linear" and training.warmup_steps == 50 and training.logging_steps == 10
    assert training.activation_checkpointing is True
    assert training.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert (training.save_steps, training.save_total_limit, training.seed, training.num_train_epochs) == (500, 2, 42, 1)
    assert training.train_sampling_strategy == "group_by_length" and training.report_to == []
    assert training.remove_unused_columns is False and training.ddp_find_unused_parameters is False
    assert training.use_cpu and not training.fp16  # no GPU here: fp32 unless --bf16
    assert (args.model.num_crops, args.lora.use_lora, args.data.packing) == (16, False, False)
    assert parse(tmp_path, num_crops=4).model.num_crops == 4  # a task's own default
    assert parse(tmp_path, "--group_by_length", "false").training.train_sampling_strategy == "random"


def test_a_task_dataclass_is_parsed_too(tmp_path):
    @dataclass
    class TaskArguments:
        data_dir: str = field(default="./data", metadata={"help": "Where the data is."})

    args = parse_args(TaskArguments, argv=["--data_dir", "videos", "--deepspeed", "none"])
    assert args.task.data_dir == "videos"
    assert parse_args(argv=["--deepspeed", "none"]).task is None


@pytest.fixture
def leaves_no_process_group():
    """Creating a run's TrainingArguments under torchrun's variables starts torch.distributed: end it after."""
    yield
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    if dist.is_initialized():
        dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def test_deepspeed_by_mode(tmp_path, monkeypatch, capsys, leaves_no_process_group):
    lora = parse_args(argv=["--output_dir", str(tmp_path), "--use_lora", "--deepspeed", "ds.json"])
    assert lora.training.deepspeed is None  # LoRA runs plain DDP, and says so
    assert "warning: --deepspeed ds.json is ignored" in capsys.readouterr().err
    assert parse(tmp_path).training.deepspeed is None  # --deepspeed none
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29517")
    full = parse_args(argv=["--output_dir", str(tmp_path)])
    assert full.training.deepspeed == str(DEFAULT_DEEPSPEED_CONFIG)
    zero = full.training.hf_deepspeed_config.config["zero_optimization"]
    assert zero["stage"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "10", "--batch_size_per_gpu", "4"], "--batch_size 10 must be a multiple of processes x "
                                                          "--batch_size_per_gpu = 1 x 4 = 4"),
    (["--batch_size_per_gpu", "0"], "--batch_size and --batch_size_per_gpu must be at least 1"),
    (["--num_crops", "0"], "--num_crops must be at least 1, got 0"),
    (["--lora_rank", "0"], "--lora_rank must be at least 1, got 0"),
    (["--max_seq_length", "0"], "--max_seq_length must be at least 1"),
    (["--cache_vision_features", "--use_lora"], "--cache_vision_features needs --freeze_vision_model"),
    (["--batchsize", "8"], "unrecognized arguments: --batchsize 8 (did you mean --batch_size?)"),
    (["--batch", "8"], "unrecognized arguments: --batch"),  # no abbreviations: --batch is not --batch_size
    (["--max_eval", "8"], "unrecognized arguments: --max_eval 8 (did you mean --max_eval_samples?)"),  # not --do_eval
    (["--num_train_epochs", "0"], "--num_train_epochs must be above 0 (or --max_steps at least 1), got 0"),
])
def test_flag_errors_are_one_line_naming_the_flag(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse(tmp_path, *argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_full_fine_tuning_without_torchrun_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv=["--output_dir", str(tmp_path)])
    assert "needs torchrun even for one process" in capsys.readouterr().err


def test_help_lists_the_flags_in_groups(capsys):
    with pytest.raises(SystemExit):
        parse_args(argv=["--help"])
    out = capsys.readouterr().out
    for group in ("model:", "LoRA:", "data and evaluation:", "training (every transformers TrainingArguments flag):"):
        assert f"\n{group}\n" in out
    assert "--batch_size_per_gpu" in out and "--wd" in out and "--optim" in out


def test_several_gpus_in_one_process_are_refused(tmp_path, monkeypatch, capsys):
    """Without torchrun the Trainer would use nn.DataParallel, which pairs images and prompts wrongly."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(SystemExit) as exit_info:
        parse(tmp_path, "--use_lora")
    assert exit_info.value.code == 2
    assert "4 GPUs are visible to one process: run it with torchrun --nproc_per_node=4" in capsys.readouterr().err


@pytest.mark.parametrize("gpu, capability, bf16", [("Tesla V100-SXM2-16GB", (7, 0), False), ("Tesla T4", (7, 5), False),
                                                  ("NVIDIA A100-SXM4-80GB", (8, 0), True)])
def test_bf16_is_replaced_by_fp16_where_the_gpu_only_emulates_it(tmp_path, monkeypatch, gpu, capability, bf16):
    """torch.cuda.is_bf16_supported(), which transformers checks, says yes on V100 and T4 too (emulated, slow)."""
    import torch

    from phivision.training import arguments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    # transformers' own checks would set the (absent) device up: they pass where torch says bf16 is supported.
    monkeypatch.setattr(arguments.TrainingArguments, "__post_init__", lambda self: None)
    warnings = []
    monkeypatch.setattr(arguments.logger, "warning", warnings.append)
    training = parse(tmp_path, "--use_lora", "--bf16").training
    assert (training.bf16, training.fp16) == (bf16, not bf16)
    assert [w for w in warnings if w.startswith("--bf16")] == ([] if bf16 else [
        f"--bf16: {gpu} (compute capability {capability[0]}.{capability[1]}) only emulates bf16, many times slower: "
        "training in fp16 instead."])


def test_zero2_accumulates_gradients_in_fp32():
    """bf16/fp16 gradients summed over 8-16 micro-batches lose precision (DeepSpeed warns): fp32 accumulation."""
    import json

    config = json.loads(DEFAULT_DEEPSPEED_CONFIG.read_text())
    assert config["data_types"]["grad_accum_dtype"] == "fp32" and config["zero_optimization"]["stage"] == 2


def test_fsdp_turns_the_default_deepspeed_config_off_and_both_are_refused(tmp_path, capsys):
    assert deepspeed_config(None, use_lora=False, fsdp=True) is None  # FSDP shards instead of ZeRO-2
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv=["--output_dir", str(tmp_path), "--deepspeed", "ds_config_zero3.json", "--fsdp"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--deepspeed ds_config_zero3.json and --fsdp both shard the model: pass one of them" in err[-1]


def test_under_fsdp_activations_are_checkpointed_by_fsdp_itself(tmp_path):
    """The Trainer's checkpointing would all-gather every layer's weights again in the backward pass."""
    args = parse_args(argv=["--output_dir", str(tmp_path), "--fsdp", "--fsdp_config", str(ROOT / "fsdp_config.json")])
    assert args.training.deepspeed is None and not args.training.activation_checkpointing
    assert args.training.fsdp_config["activation_checkpointing"] is True
    assert args.training.fsdp_plugin_args["activation_checkpointing"] is True
    assert args.training.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "Phi3DecoderLayer,CLIPEncoderLayer"
    off = parse_args(argv=["--output_dir", str(tmp_path), "--fsdp", "--gradient_checkpointing", "false"])
    assert "activation_checkpointing" not in off.training.fsdp_plugin_args


def test_gradient_checkpointing_auto_by_default_true_false_and_the_budget(tmp_path, capsys):
    auto = parse(tmp_path).training
    assert auto.auto_checkpointing and auto.activation_checkpointing is True  # the plan turns layers off
    for argv, on in ((["--gradient_checkpointing"], True), (["--gradient_checkpointing", "True"], True),
                     (["--gradient_checkpointing", "false"], False), (["--no_gradient_checkpointing"], False),
                     (["--activation_checkpointing", "true"], True)):
        training = parse(tmp_path, *argv).training
        assert (training.activation_checkpointing, training.auto_checkpointing) == (on, False), argv
    assert parse(tmp_path, "--memory_budget_gb", "40").training.memory_budget_gb == 40
    for argv, message in ((["--gradient_checkpointing", "sometimes"], "--gradient_checkpointing sometimes"),
                          (["--memory_budget_gb", "0"], "--memory_budget_gb 0")):
        with pytest.raises(SystemExit) as exit:
            parse(tmp_path, *argv)
        assert exit.value.code == 2 and message in capsys.readouterr().err


def test_an_output_dir_in_a_folder_without_write_permission_is_a_flag_error(capsys):
    from helpers import read_only_folder

    parse_args(None, ["--deepspeed", "none", "--output_dir", "out"])  # what loads lazily, loaded as ourselves
    capsys.readouterr()
    with read_only_folder() as parent:
        with pytest.raises(SystemExit) as exit_info:
            parse_args(None, ["--deepspeed", "none", "--output_dir", str(parent / "runs" / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"error: --output_dir {parent / 'runs' / 'out'}: cannot write there (no permission to "
                            f"write in {parent})"), err


def test_fp16_on_cpu_says_it_trains_in_fp32(tmp_path, caplog, monkeypatch):
    """The Trainer has no fp16 autocast on CPU: --fp16 there trains in fp32, and the run says so."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING"):
        args = parse(tmp_path, "--fp16")
    assert not args.training.fp16 and not args.training.bf16
    assert [r.getMessage() for r in caplog.records if "fp32" in r.getMessage()] == [
        "--fp16: fp16 mixed precision is unavailable on CPU, training in fp32 (pass --bf16 for bf16)."]
    assert parse(tmp_path, "--num_train_epochs", "0", "--max_steps", "3").training.max_steps == 3
