import json

from upi_fast.cli import main


def test_info_text_and_json(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "torch" in out
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backends"]["torch"] is True
    assert set(data["unavailable"]) == {k for k, v in data["backends"].items() if not v}
