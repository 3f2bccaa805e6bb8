"""Live stats: a readable line on a terminal, silence elsewhere."""

import io

from gemmalens.sinks.stats import LiveStats, format_line


def test_line_shows_progress_rate_frames_queue_and_eta():
    line = format_line({"prompts_done": 2, "prompts_total": 8, "tokens_per_second": 12.5, "seconds": 4.0,
                        "frames": 40, "queue_depth": 3})
    assert line == "prompts 2/8 | 12.5 tok/s | 10.0 frames/s | queue 3 | ETA 12s"


def test_line_shows_how_long_the_engine_and_the_sender_waited():
    line = format_line({"prompts_done": 2, "prompts_total": 8, "tokens_per_second": 12.5, "seconds": 4.0,
                        "frames": 40, "queue_depth": 3, "engine_waited_seconds": 1.0, "sinks_waited_seconds": 3.0})
    assert line.endswith("| ETA 12s | engine waited 25% | sinks behind 75%")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_quiet_when_not_a_terminal_and_live_on_one():
    quiet, live = io.StringIO(), Terminal()
    for stream in (quiet, live):
        viewer = LiveStats("inproc://unused-stats", stream=stream)
        viewer.on_stats({"prompts_done": 1, "prompts_total": 2, "seconds": 1.0})
        viewer.on_run_end({"prompts_done": 2, "prompts_total": 2, "seconds": 2.0})
        viewer.close()
    assert quiet.getvalue() == ""
    assert live.getvalue().startswith("\rprompts 1/2") and live.getvalue().endswith("\n")
