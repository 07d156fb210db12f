import pytest

from medcare_dist.tools.tiny import build_tokenizer

from helpers import fever_record, write_jsonl


@pytest.fixture(scope="session")
def fever_tokenizer(tmp_path_factory):
    """The tiny tokenizer trained on ten `fever_record`s."""
    return build_tokenizer([write_jsonl(tmp_path_factory.mktemp("corpus") / "c.jsonl", [fever_record(i) for i in range(10)])])
