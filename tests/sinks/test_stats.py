"""Live progress: a bar on a terminal, a plain line every few seconds elsewhere."""

import io

from gemmalens.sinks.stats import LiveStats, ProgressView, describe, eta_seconds, folder_bytes

STATS = {"prompts_done": 2, "prompts_total": 8, "tokens_per_second": 12.5, "seconds": 4.0, "batches_done": 1,
         "batches_total": 4, "batch": 4, "step": 9, "max_tokens": 20}


def test_line_shows_prompts_batch_step_rate_and_eta():
    # 1 batch of 20 steps and 10 of the second done in 4 s: 50 of 80 steps left, 20/3 s
    assert describe(STATS, written=2_500_000) == ("prompts 2/8 | batch 2/4 step 10/20 | 12.5 tok/s | 2.5 MB written | "
                                                  "ETA 7 s")
    assert abs(eta_seconds(STATS) - 4.0 * 50 / 30) < 1e-9


def test_line_shows_how_long_the_engine_and_the_sender_waited():
    line = describe({**STATS, "engine_waited_seconds": 1.0, "sinks_waited_seconds": 3.0})
    assert "engine waited 25%, sinks behind 75%" in line


def test_finished_run_says_done_and_eta_is_unknown_before_any_step():
    assert describe({**STATS, "prompts_done": 8}).endswith("| done")
    assert describe({"prompts_done": 0, "prompts_total": 8, "seconds": 0.0}).endswith("ETA ?")


def test_line_shows_each_saes_l0_error_and_the_last_tokens_top_features():
    line = describe({**STATS, "saes": {"res9": {"positions": 40, "mean_l0": 61.4, "mean_error": 0.123,
                                                "top_features": [[812, 14.25], [7, 3.5]]}}})
    assert "res9: L0 61, error 0.12, last token's top features 812 (14.2), 7 (3.5)" in line


def test_folder_bytes_counts_files_in_subfolders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.npz").write_bytes(b"1" * 1000)
    (tmp_path / "y.json").write_bytes(b"2" * 24)
    assert folder_bytes([tmp_path, tmp_path / "missing"]) == 1024


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_every_few_seconds_when_not_a_terminal():
    stream = io.StringIO()
    view = ProgressView(stream, every=3600)
    view.update(STATS)
    view.update({**STATS, "prompts_done": 3})  # within the interval: no second line
    view.close({**STATS, "prompts_done": 8})  # the last state is always shown
    lines = stream.getvalue().splitlines()
    assert lines == [f"progress: {describe(STATS)}", f"progress: {describe({**STATS, 'prompts_done': 8})}"]


def test_a_bar_on_a_terminal():
    stream = Terminal()
    viewer = LiveStats("inproc://unused-stats", stream=stream)
    viewer.on_stats(STATS)
    viewer.on_run_end({**STATS, "prompts_done": 8})
    viewer.close()
    text = stream.getvalue()
    assert "\r" in text and "8/8" in text and "done" in text and text.endswith("\n")
