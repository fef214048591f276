"""One status table: graft.h's GRAFT_STATUS_MAP as the library reports it, graftd's wire codes (the status
negated) and the Python constants and exceptions agree row by row."""
import re
from pathlib import Path

import graft
from graft import _lib, graft_pb2 as pb

HEADER = Path(__file__).resolve().parents[3] / "include" / "graft.h"


def header_rows():
    text = HEADER.read_text()
    table = text[text.index("#define GRAFT_STATUS_MAP(X)"):]
    table = table[:table.index("\n\n")]
    return [(name, int(code), description) for name, code, description in
            re.findall(r'X\((\w+), (-?\d+), "([^"]*)"\)', table)]


def test_the_library_reports_the_headers_table():
    rows = header_rows()
    assert len(rows) == 14
    for name, code, description in rows:
        assert _lib.STATUS_NAMES[code] == name
        assert _lib.lib.graft_status_string(code).decode() == description
        assert getattr(_lib, name) == code
    assert set(_lib.STATUS_NAMES) == {code for _, code, _ in rows}


def test_wire_codes_are_the_statuses_negated():
    for name, code, _ in header_rows():
        if code == 0:
            assert pb.Error.Code.Name(0) == "UNKNOWN"  # a wire error always carries a failure
            continue
        assert pb.Error.Code.Name(-code) == name.removeprefix("ERR_")
    assert len(pb.Error.Code.values()) == len(header_rows())


def test_exceptions_carry_the_tables_name_and_description():
    error = graft.GraftError(_lib.ERR_NOT_FOUND, "no such adapter")
    assert (error.code, error.name, error.status) == (-5, "ERR_NOT_FOUND", "not found")
    try:
        graft.load_model("/nonexistent/graft-model")
    except graft.GraftError as e:
        assert e.name == _lib.STATUS_NAMES[e.code] and e.code == _lib.ERR_NOT_FOUND
    else:
        raise AssertionError("loading a missing model did not raise")
