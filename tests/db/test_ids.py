from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from db.ids import ALPHABET, JOB_ID_LENGTH, is_job_id, new_job_id, normalize_job_id


def test_shape_and_alphabet() -> None:
    ids = {new_job_id() for _ in range(5000)}
    assert len(ids) == 5000
    for job_id in ids:
        assert len(job_id) == JOB_ID_LENGTH
        assert is_job_id(job_id)
    assert not set("ILOU") & set(ALPHABET)
    assert len(ALPHABET) == 32


def test_normalize_reads_ids_leniently() -> None:
    assert normalize_job_id(" 7k2m-9qxa ") == "7K2M9QXA"
    assert normalize_job_id("oooollll") == "00001111"
    assert normalize_job_id("abc") is None
    assert normalize_job_id("ABCDEFGU") is None  # U is not in the alphabet
    assert not is_job_id("abcdefgh")  # canonical ids are upper case


@given(st.text(alphabet=ALPHABET, min_size=JOB_ID_LENGTH, max_size=JOB_ID_LENGTH))
def test_normalize_round_trip(job_id: str) -> None:
    assert normalize_job_id(job_id.lower()) == job_id
