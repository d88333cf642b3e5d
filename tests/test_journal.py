"""The append-only journal behind the provenance store: records, torn lines, one writer."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pluginlab.journal import Journal, JournalBusy, journal_in_use, journal_path, read_records


def test_appended_lines_are_read_back_in_order(tmp_path: Path) -> None:
    path = journal_path(str(tmp_path / "db.sqlite"))
    assert path.endswith("db.sqlite-daidlog")
    journal = Journal(path)
    journal.append(b'[1,"a"]\n[2,"b"]\n')
    journal.append(b'[3,{"x":1}]\n')
    assert read_records(path) == [[1, "a"], [2, "b"], [3, {"x": 1}]]
    assert journal.size == len(b'[1,"a"]\n[2,"b"]\n[3,{"x":1}]\n')
    journal.truncate()
    assert read_records(path) == [] and journal.size == 0
    journal.append(b"[4]\n")  # appends continue after a truncation
    assert read_records(path) == [[4]]
    journal.close()
    journal.close()  # idempotent
    assert Path(path).exists()  # it holds a record: kept
    Journal(path).close()
    assert Path(path).exists()
    emptied = Journal(path)
    emptied.truncate()
    emptied.close()
    assert not Path(path).exists()  # nothing left to store: no stray file next to the db


@pytest.mark.parametrize("tail", [b'[3,"c', b"[3", b"{}\n[4]\n", b"not json\n[4]\n"])
def test_reading_stops_at_the_first_torn_or_foreign_line(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "j"
    path.write_bytes(b'[1,"a"]\n[2,"b"]\n' + tail)
    assert read_records(str(path)) == [[1, "a"], [2, "b"]]


def test_a_missing_journal_has_no_records(tmp_path: Path) -> None:
    assert read_records(str(tmp_path / "absent")) == []


def test_a_second_writer_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    path = str(tmp_path / "j")
    first = Journal(path)
    with pytest.raises(JournalBusy, match="open for writing"):
        Journal(path)
    other_process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            from pluginlab.journal import Journal, JournalBusy
            try:
                Journal({path!r})
            except JournalBusy:
                print("busy")
        """)], capture_output=True, text=True, check=False)
    assert other_process.stdout.strip() == "busy", other_process.stderr
    assert journal_in_use(path)
    first.close()
    assert not journal_in_use(path)
    assert not journal_in_use(str(tmp_path / "absent"))
    second = Journal(path)
    second.append(b"[1]\n")
    second.close()
    assert read_records(path) == [[1]]


def test_a_failed_write_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    """A real failure: the file-size limit makes the kernel refuse the write (EFBIG)."""
    path = str(tmp_path / "j")
    script = textwrap.dedent(f"""
        import errno, resource, signal
        from pluginlab.journal import Journal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        journal = Journal({path!r})
        journal.append(b"[1]\\n")
        journal.append(b"[" + b"2," * 1_000_000 + b"2]\\n")  # it grows past 4 MB when needed
        journal.truncate()
        journal.append(b"[1]\\n")
        resource.setrlimit(resource.RLIMIT_FSIZE, (5_000_000, resource.RLIM_INFINITY))
        try:
            journal.append(b"[" + b"2," * 3_000_000 + b"2]\\n")  # 6 MB: more than the file may
        except OSError as exc:
            print(exc.errno == errno.EFBIG, journal.size)
        journal.append(b"[3]\\n")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=False)
    assert result.stdout.split() == ["True", "4"], result.stderr
    assert read_records(path) == [[1], [3]]


def test_records_after_a_truncation_do_not_resurrect_older_ones(tmp_path: Path) -> None:
    path = str(tmp_path / "j")
    journal = Journal(path)
    journal.append(b'[1,"a long first record"]\n[2,"another one"]\n')
    journal.truncate()
    journal.append(b"[3]\n")
    journal.close()
    assert read_records(path) == [[3]]
    reopened = Journal(path)  # appends continue after what is there
    assert reopened.size == 4
    reopened.append(b"[4]\n")
    reopened.close()
    assert read_records(path) == [[3], [4]]
