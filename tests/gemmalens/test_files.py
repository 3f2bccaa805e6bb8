"""Files that survive crashes: atomic writes with temporary names of their own, torn lines cut off, one run per
folder."""

import json
import subprocess
import sys
import threading

import pytest

from gemmalens.errors import FolderBusy
from gemmalens.files import (CorruptLine, FolderLock, JsonLines, WriteError, partial_path, read_json_lines,
                             write_atomic)


def test_temporary_names_are_unique_per_process_and_thread(tmp_path):
    names, together = {}, threading.Barrier(3)

    def note(key):  # the threads write at the same time
        names[key] = partial_path(tmp_path / "summary.json")
        together.wait()

    threads = [threading.Thread(target=note, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from gemmalens.files import partial_path; print(partial_path(Path(sys.argv[1])))",
                            str(tmp_path / "summary.json")], capture_output=True, text=True, check=True)
    assert len(set(names.values()) | {other.stdout.strip()}) == 4


def test_atomic_writes_leave_no_temporary_file_and_say_where_they_failed(tmp_path):
    write_atomic(tmp_path / "a.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    with pytest.raises(WriteError, match=r"cannot write .*missing/a\.json"):
        write_atomic(tmp_path / "missing" / "a.json", b"{}")


def test_a_torn_last_line_is_cut_off_when_the_file_is_opened_again(tmp_path):
    path = tmp_path / "results.jsonl"
    lines = JsonLines(path)
    lines.append({"id": 0})
    lines.close()
    with open(path, "a") as handle:
        handle.write('{"id": 1, "te')  # a crash mid-line
    assert read_json_lines(path) == ([{"id": 0}], len('{"id": 1, "te'))
    lines = JsonLines(path)
    assert lines.torn == len('{"id": 1, "te')
    lines.append({"id": 1})
    lines.close()
    assert read_json_lines(path) == ([{"id": 0}, {"id": 1}], 0)


def test_a_damaged_line_before_the_end_is_reported_with_its_number(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": 0}\nnot json\n{"id": 2}\n')
    with pytest.raises(CorruptLine, match=r"results\.jsonl:2: not a JSON object"):
        read_json_lines(path)


def test_one_holder_per_folder_and_the_refusal_names_it(tmp_path):
    first = FolderLock(tmp_path).acquire()
    script = ("import sys; from gemmalens.files import FolderLock\n"
              "try:\n    FolderLock(sys.argv[1]).acquire()\nexcept Exception as e:\n    print(e)")
    refused = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True).stdout
    holder = json.loads((tmp_path / ".gemmalens.lock").read_text())
    assert f"pid {holder['pid']} on {holder['host']}" in refused and "in use by another gemmalens run" in refused
    with pytest.raises(FolderBusy):
        FolderLock(tmp_path).acquire()
    first.release()
    FolderLock(tmp_path).acquire().release()


def test_a_lock_held_by_a_killed_process_is_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from gemmalens.files import FolderLock; "
                               "lock = FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderBusy):
        FolderLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    FolderLock(tmp_path).acquire().release()
