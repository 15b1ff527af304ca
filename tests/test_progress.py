import io

from offload_bitnet.progress import Progress, format_seconds


def test_durations_say_their_units():
    assert [format_seconds(s) for s in (0, 7, 45, 59.6, 60, 200, 3599, 3600, 3720, 86399, 86400, 26 * 3600 + 300,
                                        40 * 86400 + 7 * 3600)] == \
        ["0s", "7s", "45s", "1m00s", "1m00s", "3m20s", "59m59s", "1h00m", "1h02m", "23h59m", "1d00h", "1d02h", "40d07h"]
    assert format_seconds(-5) == "0s"


def test_progress_lines_use_the_same_format():
    stream = io.StringIO()
    progress = Progress(3, "units", stream=stream, log_interval=0.0)
    progress.update(note="a")
    line = stream.getvalue().splitlines()[-1]
    assert line.startswith("units 1/3 a [") and "s elapsed, ETA " in line and line.endswith("s]")
