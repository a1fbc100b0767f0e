"""Cleaning of the 13 raw sample books, bad input, and resumable polite downloads."""

import http.server
import threading
from pathlib import Path

import pytest

from litgpt_mm.data import gutenberg as pg
from litgpt_mm.data.download import download

# (file stem, first body line, last body line) checked by hand against the raw files
EXPECTED = {
    "pg11_alices_adventures_in_wonderland": ("ALICE’S ADVENTURES IN WONDERLAND", "THE END"),
    "pg120_treasure_island": (
        "TREASURE ISLAND",
        "still ringing in my ears: “Pieces of eight! Pieces of eight!”",
    ),
    "pg1342_pride_and_prejudice": (None, "TOOKS COURT, CHANCERY LANE, LONDON."),
    "pg1661_adventures_of_sherlock_holmes": (
        "The Adventures of Sherlock Holmes",
        "Walsall, where I believe that she has met with considerable success.",
    ),
    "pg2701_moby_dick": (
        "Produced by Daniel Lazarus, Jonesey, and David Widger",
        "children, only found another orphan.",
    ),
    "pg43_strange_case_of_dr_jekyll_and_mr_hyde": (
        "Produced by David Widger",
        "confession, I bring the life of that unhappy Henry Jekyll to an end.",
    ),
    "pg4650_candide_fr": ("The Project Gutenberg Etext of Candide", "FIN DE CANDIDE."),
    "pg4657_pilgrimage_to_al_madinah_and_meccah": (
        "This etext was produced by William Thierens and Robert Sinton.",
        "END OF VOLUME I.",
    ),
    "pg46_a_christmas_carol": ("Produced by Jose Menendez", "observed, God bless Us, Every One!"),
    "pg5200_metamorphosis": ("Copyright (C) 2002 David Wyllie.", "first to get up and stretch out her young body."),
    "pg768_wuthering_heights": (None, "unquiet slumbers for the sleepers in that quiet earth."),
    "pg844_the_importance_of_being_earnest": (None, "TABLEAU"),
    "pg98_a_tale_of_two_cities": ("Produced by Judith Boss", None),
}
LICENCE = (
    "Project Gutenberg-tm",
    "www.gutenberg.org",
    "START OF THE PROJECT",
    "START OF THIS PROJECT",
    "END OF THE PROJECT",
    "END OF THIS PROJECT",
    "This file should be named",
    "FULL LICENSE",
    "SMALL PRINT",
)


def test_sample_is_complete(gutenberg_dir):
    assert sorted(p.stem for p in gutenberg_dir.glob("*.txt")) == sorted(EXPECTED)


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_strip_boilerplate(gutenberg_dir, stem):
    raw = (gutenberg_dir / f"{stem}.txt").read_bytes()
    book = pg.load_book(gutenberg_dir / f"{stem}.txt")
    lines = [line for line in book.text.split("\n") if line.strip()]
    first, last = EXPECTED[stem]
    if first is not None:
        assert lines[0].strip() == first
    if last is not None:
        assert lines[-1].strip() == last
    for marker in LICENCE:
        assert marker not in book.text, f"{stem}: boilerplate {marker!r} left in the body"
    assert "\r" not in book.text and not book.text.startswith("\ufeff")
    assert 0.5 < len(book.text.encode()) / len(raw) < 1.0  # the body is most of the file, the boilerplate is gone
    assert book.language == ("fr" if "candide" in stem else "en")
    assert book.ebook_id == int(stem[2:].split("_")[0])


def test_pg98_ends_with_carton(gutenberg_dir):
    text = pg.load_book(gutenberg_dir / "pg98_a_tale_of_two_cities.txt").text
    assert text.rstrip().split("\n")[-1].startswith("far, far better rest that I go to than I have ever")


def test_missing_markers_are_reported_by_name(tmp_path):
    no_start = tmp_path / "nostart.txt"
    no_start.write_text("Title: x\n\nsome text\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n")
    with pytest.raises(pg.BoilerplateError, match="nostart.txt: no .*START"):
        pg.load_book(no_start)
    no_end = tmp_path / "noend.txt"
    no_end.write_text("*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\nmore body\n")
    with pytest.raises(pg.BoilerplateError, match="noend.txt: no .*END"):
        pg.load_book(no_end)
    empty = tmp_path / "empty.txt"
    empty.write_text("*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***")
    with pytest.raises(pg.BoilerplateError, match="empty.txt: .*empty"):
        pg.load_book(empty)


def test_declared_encoding_and_bad_bytes(tmp_path):
    body = "Voilà l'été.\n"
    latin = tmp_path / "latin.txt"
    latin.write_bytes(
        (
            "Character set encoding: ISO-8859-1\r\nLanguage: French\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
            + body
            + "*** END OF THIS PROJECT GUTENBERG EBOOK X ***"
        ).encode("latin-1")
    )
    book = pg.load_book(latin)
    assert book.text == body and book.language == "fr"
    broken = tmp_path / "broken.txt"
    broken.write_bytes(b"*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\xff\xfe bad\n*** END OF THE PROJECT")
    with pytest.raises(UnicodeDecodeError, match="broken.txt is not valid UTF-8"):
        pg.load_book(broken)


def test_select_from_catalog():
    csv_text = (
        "Text#,Type,Issued,Title,Language,Authors,Subjects,LoCC,Bookshelves\n"
        "1,Text,1971-12-01,A,en,,,,\n2,Text,1972-01-01,B,fr,,,,\n3,Sound,1972-01-01,C,en,,,,\n"
        "4,Text,1972-01-01,D,en; fr,,,,\n5,Text,1972-01-01,E,en,,,,\n"
    )
    assert pg.select_from_catalog(csv_text, "en", 10) == [1, 4, 5]
    assert pg.select_from_catalog(csv_text, "fr", 10) == [2, 4]
    assert len(pg.select_from_catalog(csv_text, None, 2, seed=1)) == 2


class _FlakyRangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `payload`; the first GET breaks off half-way, later ones honour `Range`."""

    payload = b"".join(f"line {i}\n".encode() for i in range(5000))
    requests: list[str | None] = []

    def do_GET(self):  # noqa: N802
        if "/404/" in self.path:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        self.requests.append(rng)
        if len(self.requests) == 1:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.payload)))
            self.end_headers()
            self.wfile.write(self.payload[: len(self.payload) // 2])
            self.wfile.flush()
            self.connection.close()
            return
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(self.payload) - start))
        self.end_headers()
        self.wfile.write(self.payload[start:])

    def log_message(self, *args):
        pass


def test_download_resumes_a_partial_file_and_caches(tmp_path):
    _FlakyRangeHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyRangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/cache/epub/7/pg7.txt"
        dest = tmp_path / "pg7.txt"
        download(url, dest, retries=2, backoff=0.01, timeout=5)
        assert dest.read_bytes() == _FlakyRangeHandler.payload
        assert _FlakyRangeHandler.requests[0] is None
        assert _FlakyRangeHandler.requests[1] == f"bytes={len(_FlakyRangeHandler.payload) // 2}-"
        assert not Path(str(dest) + ".part").exists()
        download(url, dest)  # cached: no new request
        assert len(_FlakyRangeHandler.requests) == 2
        paths, failures = pg.download_books(
            [7, 404], tmp_path, mirror=f"http://127.0.0.1:{server.server_port}", delay=0, retries=0
        )
        assert paths == [dest]
        assert failures and failures[0][0] == "pg404" and "download failed" in failures[0][1]
    finally:
        server.shutdown()
