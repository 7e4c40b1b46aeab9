"""Preference tuning's loss on a fixed batch: what the trainer computes and logs equals the DPO / IPO / RPO formulas
computed here by hand, from log-probs of each sequence run alone through the model (full logits, no padding)."""

import math

import pytest
import torch
from helpers import identity, random_image
from transformers import TrainingArguments

from phivision.collator import DataCollator
from phivision.families import family_of
from phivision.data.preference import rejected_conversation
from phivision.training.preference import PreferenceCollator, PreferenceLoss, PreferenceTrainer


def pair(question, chosen, rejected, *images):
    turn = {"user": question, "assistant": chosen, "rejected": rejected}
    if images:
        turn["images"] = list(images)
    return [turn], list(images)


PAIRS = [pair("What colour is the shape?", "red", "a blue one, I think", random_image(40, 30)),
         pair("Say the word green.", "green", "no"),
         pair("Compare them.", "They are the same.", "Different.", random_image(30, 40, 1), random_image(50, 20, 2))]


def load(folder, lora=False):
    family = family_of(str(folder))
    processor = family.load_processor(str(folder))
    model = family.model_class().from_pretrained(folder, dtype=torch.float32)
    model = family.as_it_runs_on_images(model, str(folder))
    family.prepare_for_training(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", task_type="CAUSAL_LM",
                            target_modules=family.lora_targets(model, include_vision=True))
        model = get_peft_model(model, config)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # as after some training: the policy differs from the reference
                torch.nn.init.normal_(parameter, std=0.05)
    return family, processor, model.eval()


def logp_alone(model, processor, conversation, images):
    """The summed answer log-prob and token count of one sequence, from the whole logits of it run alone."""
    batch = DataCollator(processor, identity, num_crops=1)([(conversation, images)])
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits.float()
    targets = labels[0, 1:]
    logps = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, targets.clamp(min=0)[:, None])[:, 0]
    answer = targets != -100
    return float(logps[answer].sum()), int(answer.sum())


def by_hand(model, processor, pairs):
    """[(chosen logp, rejected logp, chosen tokens, rejected tokens)] of each pair."""
    out = []
    for conversation, images in pairs:
        chosen = logp_alone(model, processor, conversation, images)
        rejected = logp_alone(model, processor, rejected_conversation(conversation), images)
        out.append((chosen[0], rejected[0], chosen[1], rejected[1]))
    return out


def expected(policy, reference, beta, loss_type, rpo_alpha):
    losses, chosen_rewards, rejected_rewards = [], [], []
    for (pc, pr, nc, nr), (rc, rr, _, _) in zip(policy, reference):
        if loss_type == "ipo":
            pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
        logits = (pc - pr) - (rc - rr)
        losses.append((logits - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else math.log1p(math.exp(-beta * logits)))
        chosen_rewards.append(beta * (pc - rc))
        rejected_rewards.append(beta * (pr - rr))
    n = len(policy)
    loss = sum(losses) / n
    if rpo_alpha is not None:
        loss += rpo_alpha * -sum(p[0] for p in policy) / sum(p[2] for p in policy)
    return loss, {
        "rewards/chosen": sum(chosen_rewards) / n,
        "rewards/rejected": sum(rejected_rewards) / n,
        "rewards/margins": sum(c - r for c, r in zip(chosen_rewards, rejected_rewards)) / n,
        "rewards/accuracies": sum(c > r for c, r in zip(chosen_rewards, rejected_rewards)) / n,
    }


def trainer_for(model, tmp_path, settings):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True)
    return PreferenceTrainer(model=model, args=args, preference=settings)


@pytest.mark.parametrize("loss_type, rpo_alpha, packing", [("sigmoid", None, False), ("ipo", None, False),
                                                           ("sigmoid", 0.7, True)])
def test_loss_and_logged_rewards_equal_the_formulas_with_the_adapter_disabled_as_reference(
        tiny, tmp_path, loss_type, rpo_alpha, packing):
    """LoRA: the reference is the base with the adapter disabled, in the same forward pass's batch of 2B sequences
    (chosen then rejected, images given twice), padded or packed."""
    family, processor, model = load(tiny, lora=True)
    settings = PreferenceLoss(beta=0.25, loss_type=loss_type, rpo_alpha=rpo_alpha)
    collator = PreferenceCollator(processor, identity, num_crops=1, packing=packing)
    batch = collator.collate([collator.encode(p) for p in PAIRS])
    assert batch["input_ids"].shape[0] == (1 if packing else 2 * len(PAIRS))
    policy = by_hand(model, processor, PAIRS)
    with model.disable_adapter():
        reference = by_hand(model, processor, PAIRS)
    assert all(abs(p[0] - r[0]) > 1e-4 for p, r in zip(policy, reference))  # the adapter changes the log-probs
    want_loss, want_metrics = expected(policy, reference, 0.25, loss_type, rpo_alpha)

    trainer = trainer_for(model, tmp_path, settings)
    model.train()  # as in training: the metrics are collected for the next log
    loss = trainer.compute_loss(model, dict(batch))
    assert loss.item() == pytest.approx(want_loss, rel=1e-6, abs=1e-6)
    trainer.log({"loss": loss.item()})
    logged = trainer.state.log_history[-1]
    for name, value in want_metrics.items():
        assert logged[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
    assert ("nll_loss" in logged) == (rpo_alpha is not None)


def test_stored_reference_logps_are_used_and_a_full_model_gets_gradients(tiny, tmp_path):
    """Full fine-tuning: the batch carries the reference log-probs stored before training; the loss is the
    formula's with them, and it trains the model's weights."""
    family, processor, model = load(tiny)
    policy = by_hand(model, processor, PAIRS)
    stored = [[c - 0.5 * (k + 1), r + 0.25 * k] for k, (c, r, _, _) in enumerate(policy)]
    reference = [(c, r, 0, 0) for c, r in stored]
    collator = PreferenceCollator(processor, identity, num_crops=1)
    batch = collator.collate([{**collator.encode(p), "reference_logps": s} for p, s in zip(PAIRS, stored)])
    assert batch["reference_logps"].tolist() == [s[0] for s in stored] + [s[1] for s in stored]
    want_loss, want_metrics = expected(policy, reference, 0.1, "sigmoid", None)
    trainer = trainer_for(model, tmp_path, PreferenceLoss())
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    assert loss.item() == pytest.approx(want_loss, rel=1e-6, abs=1e-6)
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    trainer.log({"loss": loss.item()})
    for name, value in want_metrics.items():
        assert trainer.state.log_history[-1][name] == pytest.approx(value, rel=1e-6, abs=1e-6), name


def test_phi4mm_answer_logps_through_its_family_hook(tiny_phi4mm, tmp_path):
    """Phi-4-MM's hook (logits at answer positions, a text-only batch still runs the image embedding) gives each
    sequence's log-prob as the model's whole logits do."""
    family, processor, model = load(tiny_phi4mm, lora=True)
    policy = by_hand(model, processor, PAIRS)
    with model.disable_adapter():
        reference = by_hand(model, processor, PAIRS)
    collator = PreferenceCollator(processor, identity, num_crops=1)
    batch = collator.collate([collator.encode(p) for p in PAIRS[1:2]])  # text only
    want_loss, _ = expected(policy[1:2], reference[1:2], 0.1, "sigmoid", None)
    trainer = trainer_for(model, tmp_path, PreferenceLoss())
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    assert loss.item() == pytest.approx(want_loss, rel=1e-6, abs=1e-6)
    loss.backward()
    assert any(".image_embed." in n and p.grad is not None for n, p in model.named_parameters())
    batch = collator.collate([collator.encode(p) for p in PAIRS])
    want_loss, _ = expected(policy, reference, 0.1, "sigmoid", None)
    assert float(trainer.compute_loss(model, dict(batch))) == pytest.approx(want_loss, rel=1e-6, abs=1e-6)


def test_preference_accuracy_counts_a_tie_half():
    from phivision.training.preference import preference_accuracy

    reference = {0: [-5.0, -6.0], 1: [-4.0, -4.0], 2: [-3.0, -1.0], 3: [-2.0, -2.0]}
    policy = {0: [-5.0, -6.0],  # the reference itself: a tie
              1: [-3.0, -5.0],  # chosen up 1, rejected down 1: margin 2
              2: [-4.0, -1.0],  # chosen down 1: margin -1
              3: [-1.0, -1.5]}  # both up, chosen more: margin 0.5
    assert preference_accuracy(policy, reference) == {"preference_accuracy": (0.5 + 1 + 0 + 1) / 4,
                                                      "mean_logratio_margin": (0 + 2 - 1 + 0.5) / 4, "num_pairs": 4}
    assert preference_accuracy(reference, reference)["preference_accuracy"] == 0.5


def test_stored_reference_is_reused_only_for_the_same_rows_and_model(tmp_path):
    from phivision.training.preference import load_reference, save_reference

    path, source = tmp_path / "reference_logps.json", {"model": "a", "num_crops": 1, "continue_vision_lora": False}
    logps = {3: [-1.5, -2.25], 7: [-0.125, -3.0]}
    save_reference(path, [3, 7], logps, source)
    assert load_reference(path, [3, 7], source) == logps
    assert load_reference(path, [3, 7, 9], source) is None  # other rows: computed again
    assert load_reference(path, [3, 7], {**source, "model": "b"}) is None  # another starting model
    assert load_reference(tmp_path / "missing.json", [3, 7], source) is None


def test_the_reference_pass_puts_a_model_still_on_the_cpu_onto_the_training_device():
    """Under DeepSpeed the Trainer places the model only in train(): the reference log-probs, computed before,
    would run a CPU model on device batches (with --skip_eval_before nothing else has moved it)."""
    from types import SimpleNamespace

    from phivision.training.recipe import on_training_device

    model = torch.nn.Linear(2, 2)
    on_training_device(model, SimpleNamespace(training=SimpleNamespace(device=torch.device("cpu"))))
    assert model.weight.device.type == "cpu"
    on_training_device(model, SimpleNamespace(training=SimpleNamespace(device=torch.device("meta"))))  # a stand-in
    assert model.weight.device.type == "meta"


def test_each_pairs_images_run_through_the_vision_tower_once_with_the_gradients_of_running_them_twice(tiny):
    """Phi-3-V: the tower sees each pair's images once (the chosen half's), and the log-probs and every gradient
    (the tower's included) are those of the batch run as collated, every image twice."""
    from phivision.training.preference import pair_logps

    family, processor, model = load(tiny)
    model.train()
    collator = PreferenceCollator(processor, identity, num_crops=1)
    batch = collator.collate([collator.encode(p) for p in PAIRS])
    assert len(batch["pixel_values"]) == 6  # 3 images per half
    tower = family.vision_module(model)
    seen = []
    hook = tower.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    results = []
    for run in (lambda: pair_logps(family, model, batch), lambda: family.answer_logps(model, dict(batch))):
        model.zero_grad()
        out = run()
        logps = out[0] if len(out) == 2 else out[0].sum(dim=1)
        logps.sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    hook.remove()
    assert seen == [3, 6]
    (once, grads_once), (twice, grads_twice) = results
    torch.testing.assert_close(once, twice, rtol=1e-6, atol=1e-5)
    assert grads_once.keys() == grads_twice.keys() and any(".vision_embed_tokens." in n for n in grads_once)
    for name in grads_once:
        torch.testing.assert_close(grads_once[name], grads_twice[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_tower_runs_under_the_autocast_the_trainer_gives_the_model(tiny, tmp_path, bf16):
    """The tower runs outside the model's forward (which accelerate wraps in autocast under --bf16 without DeepSpeed),
    so the trainer runs it under the same autocast: bf16 features from fp32 weights, as inside the forward. LoRA: the
    policy's pass and the reference's (the adapter disabled)."""
    family, processor, model = load(tiny, lora=True)
    collator = PreferenceCollator(processor, identity, num_crops=1)
    batch = collator.collate([collator.encode(p) for p in PAIRS])
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=bf16)
    trainer = PreferenceTrainer(model=model, args=args, preference=PreferenceLoss())
    dtypes = []
    hook = family.vision_module(model).register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    trainer.compute_loss(model, dict(batch))
    hook.remove()
    assert dtypes == [torch.bfloat16 if bf16 else torch.float32] * 2
