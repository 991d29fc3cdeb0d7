"""`python -m launcher check`: the proofs pass on the real code, and each planted bug fails exactly
the proof meant to catch it, with a report that says where.

The bugs are planted from outside, as a user's broken fork would have them: a chat template that
trains the reply header, a loss that averages each micro-batch separately (mean of means), a resume
that replays a batch. Nothing in the product knows about them.
"""

from __future__ import annotations

import json

import pytest

from helpers import REPO, chat_records, run_cli, small_job
from launcher.check import FAIL, PASS, SKIP, check_job, format_report
from launcher.config import ConfigError

DEMO_JOB = REPO / "examples" / "demo_job.toml"
ALL_PASS = {"masks": PASS, "accumulation": PASS, "resume": PASS, "processes": SKIP, "determinism": PASS}

# ChatML with {% generation %} markers, written out here: the marked span is what the data layer trains.
REPLY = "{{- message['content'] + '<|im_end|>' }}"
OTHER_TURN = "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"


def chatml(reply: str, other_turn: str = OTHER_TURN) -> str:
    """A ChatML template whose assistant turn is `reply` (Jinja) and whose other turns are `other_turn`."""
    return ("{%- for message in messages %}{%- if message['role'] == 'assistant' %}" + reply + "{%- else %}"
            + other_turn + "{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


RIGHT = chatml("{{- '<|im_start|>assistant\\n' }}{% generation %}" + REPLY + "{% endgeneration %}{{- '\\n' }}")
HEADER_TRAINED = chatml("{% generation %}{{- '<|im_start|>assistant\\n' }}" + REPLY
                        + "{% endgeneration %}{{- '\\n' }}")
NEWLINE_TRAINED = chatml("{{- '<|im_start|>assistant\\n' }}{% generation %}" + REPLY
                         + "{{- '\\n' }}{% endgeneration %}")
END_NOT_TRAINED = chatml("{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] }}"
                         "{% endgeneration %}{{- '<|im_end|>\\n' }}")
SYSTEM_TRAINED = chatml(
    "{{- '<|im_start|>assistant\\n' }}{% generation %}" + REPLY + "{% endgeneration %}{{- '\\n' }}",
    "{{- '<|im_start|>' + message['role'] + '\\n' }}{%- if message['role'] == 'system' %}{% generation %}"
    "{{- message['content'] }}{% endgeneration %}{%- else %}{{- message['content'] }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}")
# What Qwen3's template does: an empty reasoning block before every reply, inside the trained span.
EMPTY_THINK = chatml("{{- '<|im_start|>assistant\\n' }}{% generation %}{{- '<think>\\n\\n</think>\\n\\n' }}" + REPLY
                     + "{% endgeneration %}{{- '\\n' }}")


@pytest.fixture
def demo(tmp_path, tiny_model_dir):
    """Overrides that run the demo job on the tiny model, with its output folder and cache under tmp_path."""
    return {"model.model_path": str(tiny_model_dir), "output.output_dir": str(tmp_path / "demo-output"),
            "data.cache_dir": str(tmp_path / "demo-cache")}


def statuses(report) -> dict[str, str]:
    return {proof.name: proof.status for proof in report.proofs}


def template_file(folder, text: str) -> str:
    path = folder / "template.jinja"
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- the real code passes ----------------------------------------------------------------------------

def test_check_passes_on_the_demo_job_and_never_touches_its_output_dir_or_cache(tmp_path, demo):
    report = check_job(DEMO_JOB, demo)
    assert statuses(report) == ALL_PASS, format_report(report)
    assert not (tmp_path / "demo-output").exists() and not (tmp_path / "demo-cache").exists()
    text = format_report(report)
    assert "tolerance 1e-05" in text and "all 4 proofs passed (1 skipped)" in text


@pytest.mark.slow
def test_check_passes_on_a_packed_job_with_accumulation_on_two_processes(tmp_path, tiny_model_dir):
    job = small_job(tmp_path / "job", tiny_model_dir, chat_records(48), **{
        "data.packing": True, "data.max_length": 256, "hyperparams.gradient_accumulation": 2,
        "launch.num_processes": 2})
    report = check_job(job, scratch_dir=tmp_path / "scratch")
    assert statuses(report) == {**ALL_PASS, "processes": PASS}, format_report(report)
    assert "2 processes = 1 process x 4 accumulation" in report.proof("processes").summary
    # The launched run is a real two-process run: its manifest says so.
    manifest = json.loads((tmp_path / "scratch" / "processes-2" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert not (tmp_path / "job" / "out").exists()


def test_check_streams_a_streaming_job_and_never_caches_its_data(tmp_path, tiny_model_dir):
    """A stream is read while training: the proofs stream it too, and nothing tokenizes it into a cache."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.Table.from_pylist(chat_records(40)), tmp_path / "parquet" / "0.parquet")
    job = small_job(tmp_path / "job", tiny_model_dir, **{
        "data.dataset_path": str(tmp_path / "parquet"), "data.streaming": True, "data.packing": True,
        "data.cache_dir": str(tmp_path / "cache")})
    report = check_job(job, scratch_dir=tmp_path / "scratch")
    assert {**statuses(report), "masks": SKIP} == {**ALL_PASS, "masks": SKIP}, format_report(report)
    assert any("the job's stream (data.streaming)" in note for note in report.notes)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "job" / "out").exists()
    # The proof runs streamed: their checkpoints hold the stream's place.
    progress = json.loads((tmp_path / "scratch" / "straight" / "checkpoints" / "step_000002" / "progress.json")
                          .read_text())
    assert progress["stream"]


# --- planted bugs fail exactly their proof ---------------------------------------------------------

def test_a_template_that_trains_the_reply_header_fails_the_masks_proof_only(tmp_path, demo):
    report = check_job(DEMO_JOB, {**demo, "data.chat_template": template_file(tmp_path, HEADER_TRAINED)})
    assert statuses(report) == {**ALL_PASS, "masks": FAIL}, format_report(report)
    masks = report.proof("masks")
    assert "the header trained" in masks.summary
    assert any("data/chat.jsonl:1: the header of messages[1] (assistant) is trained: '<|im_start|>assistant\\n'"
               in line for line in masks.details), masks.details


def test_mean_of_means_accumulation_fails_the_accumulation_proof_only(demo, monkeypatch):
    import loop.train

    # The bug: each micro-batch's loss is averaged over its own tokens, and the micro-batch means are
    # averaged (Accelerate divides by the accumulation steps). Planted by rescaling each micro-batch's
    # summed loss from the window's token mean to its own mean: the step then backpropagates
    # mean_i(loss_i / tokens_i) instead of sum_i(loss_i) / sum_i(tokens_i).
    real_count_tokens, real_loss = loop.train.count_tokens, loop.train.summed_token_loss
    window_tokens: list[int] = []

    def count_tokens(window):
        window_tokens[:] = [int((batch["labels"][:, 1:] != -100).sum()) for batch in window]
        return real_count_tokens(window)

    def summed_token_loss(model, batch, *args, **kwargs):
        row_losses, row_tokens = real_loss(model, batch, *args, **kwargs)
        own_tokens = int((batch["labels"][:, 1:] != -100).sum())
        return row_losses * sum(window_tokens) / (len(window_tokens) * own_tokens), row_tokens

    monkeypatch.setattr(loop.train, "count_tokens", count_tokens)
    monkeypatch.setattr(loop.train, "summed_token_loss", summed_token_loss)
    report = check_job(DEMO_JOB, demo)
    assert statuses(report) == {**ALL_PASS, "accumulation": FAIL}, format_report(report)
    details = "\n".join(report.proof("accumulation").details)
    assert "losses first differ beyond the tolerance at step 1" in details
    assert "token mean over its whole accumulation window" in details


def test_a_resume_that_replays_a_batch_fails_the_resume_proof_only(demo, monkeypatch):
    import loop.train

    real_windows = loop.train.windows

    def replaying_windows(loader, accelerator, accumulation, start_epoch, start_batch):
        return real_windows(loader, accelerator, accumulation, start_epoch, max(start_batch - 1, 0))

    monkeypatch.setattr(loop.train, "windows", replaying_windows)
    report = check_job(DEMO_JOB, demo)
    assert statuses(report) == {**ALL_PASS, "resume": FAIL}, format_report(report)
    details = "\n".join(report.proof("resume").details)
    # Steps 1-2 ran before the stop; the first step after the resume is the first to differ.
    assert "losses first differ beyond the tolerance at step 3" in details
    assert "replayed or skipped batch" in details


# --- masks, fast (--quick) ---------------------------------------------------------------------------

@pytest.mark.parametrize("template, kind, example", [
    (NEWLINE_TRAINED, "next-turn text trained", "next-turn text (after the last end-of-turn token) is trained: '\\n'"),
    (END_NOT_TRAINED, "end-of-turn token not trained", "the end-of-turn token '<|im_end|>' after messages[1] is not "
                                                       "trained"),
    (SYSTEM_TRAINED, "system text trained", "system text (messages[0]) is trained: 'You are a helpful assistant.'"),
], ids=["next-turn newline", "end-of-turn", "system prompt"])
def test_each_kind_of_wrong_mask_is_named_with_its_record(tmp_path, make_job, template, kind, example):
    config = make_job(tmp_path, data__chat_template=template_file(tmp_path, template))
    report = check_job(config.source, quick=True)
    masks = report.proof("masks")
    assert masks.status == FAIL and kind in masks.summary, format_report(report)
    assert any(example in line for line in masks.details), masks.details
    assert {p.name for p in report.proofs if p.status == SKIP} == {"accumulation", "resume", "processes",
                                                                    "determinism"}


def test_template_text_trained_with_the_replies_is_listed_not_failed(tmp_path, make_job):
    for template, listed in ((RIGHT, False), (EMPTY_THINK, True)):
        config = make_job(tmp_path, data__chat_template=template_file(tmp_path, template))
        masks = check_job(config.source, quick=True).proof("masks")
        assert masks.status == PASS, masks
        assert any("'<think>\\n\\n</think>\\n\\n' in 20 replies" in line for line in masks.details) is listed


def test_the_tokenizers_own_template_without_markers_passes(tmp_path, make_job):
    # The tiny model's template has no {% generation %} markers: replies are found by rendering prefixes.
    masks = check_job(make_job(tmp_path).source, quick=True).proof("masks")
    assert masks.status == PASS, masks
    assert "each of 20 complete replies ends with its end-of-turn token" in masks.summary
    assert masks.details[0] == "end-of-turn tokens: '<|im_end|>' (20)"


# --- the command ------------------------------------------------------------------------------------

def test_the_command_exits_0_when_all_pass_1_when_a_proof_fails_2_when_refused(tmp_path, make_job, capsys):
    job = make_job(tmp_path).source
    code, out, _ = run_cli(["check", job, "--quick"], capsys)
    assert code == 0 and "PASS  masks" in out and "all 1 proofs passed (4 skipped)" in out
    header_trained = template_file(tmp_path, HEADER_TRAINED)
    code, out, _ = run_cli(["check", job, "--quick", "--set", f"data.chat_template={header_trained}"], capsys)
    assert code == 1 and "FAIL  masks" in out and "1 of 1 proofs FAILED: masks" in out
    code, _, err = run_cli(["check", job, "--set", "hyperparams.batch_sise=2"], capsys)
    assert code == 2 and "batch_sise" in err and "batch_size" in err


def test_check_refuses_to_run_inside_a_distributed_launch(tmp_path, make_job, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="python -m launcher check"):
        check_job(make_job(tmp_path).source, quick=True)
