"""Generated files: their structure follows the records; the drift check catches staleness."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import avro.schema
import pytest

from generators import sql
from generators.artifacts import GENERATED_BY, artifacts, check_artifacts, write_artifacts
from models import RECORDS, StreamRecord, TableSpec, TopicSpec
from models.types import DECIMAL_PRECISION, DECIMAL_SCALE, Price, Text, Timestamp

ROOT = Path(__file__).resolve().parent.parent
FAUST = Path(sys.executable).parent / "faust"
JSON_TYPES = {"decimal": "string", "timestamp": "string", "text": "string", "integer": "integer"}


def read_json(relative: str) -> dict[str, Any]:
    return json.loads((ROOT / relative).read_text())


def copy_generated(destination: Path) -> None:
    """Copy the repository's generated files (as committed) into another project root."""
    for relative in artifacts():
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)


def faust_schema(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FAUST), "-A", "app", "schema", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- structure ------------------------------------------------------------------------------


@pytest.mark.parametrize("record_type", RECORDS, ids=lambda r: r.__name__)
def test_json_schema_files_follow_the_field_shapes(record_type: type[StreamRecord]) -> None:
    schema = read_json(f"schemas/json/{record_type.__name__}.schema.json")
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert schema["required"] == [shape.name for shape in record_type.shapes()]
    assert schema["x-qicore"]["topic"] == record_type.topic.name
    assert schema["x-qicore"]["table"] == record_type.table.name
    assert list(schema["properties"]) == schema["required"]
    for shape in record_type.shapes():
        prop = schema["properties"][shape.name]
        assert prop.get("description") == shape.description
        if shape.nullable:
            value, null = prop["anyOf"]
            assert null == {"type": "null"}
        else:
            value = prop
        assert value["type"] == JSON_TYPES[shape.kind], shape.name
        if shape.kind == "decimal":
            assert value["x-precision"] == DECIMAL_PRECISION
            assert value["x-scale"] == DECIMAL_SCALE
            assert ("not" in value) is shape.non_negative, shape.name
        if shape.kind == "timestamp":
            assert value["format"] == "date-time"
        if shape.kind == "text":
            assert (value["minLength"], value["maxLength"]) == (1, 256)
        if shape.kind == "integer":
            assert value["minimum"] == 0


@pytest.mark.parametrize("record_type", RECORDS, ids=lambda r: r.__name__)
def test_avsc_files_carry_decimal_and_timestamp_logical_types(
    record_type: type[StreamRecord],
) -> None:
    text = (ROOT / f"schemas/avro/{record_type.__name__}.avsc").read_text()
    parsed = avro.schema.parse(text)
    assert isinstance(parsed, avro.schema.RecordSchema)
    assert parsed.namespace == "qicore.models"
    fields = {field.name: field for field in parsed.fields}
    for shape in record_type.shapes():
        field = fields[shape.name]
        avro_type = field.type
        if shape.nullable:
            assert isinstance(avro_type, avro.schema.UnionSchema)
            null, avro_type = avro_type.schemas
            assert null.type == "null"
            assert field.has_default and field.default is None
        else:
            assert not field.has_default
        if shape.kind == "decimal":
            assert isinstance(avro_type, avro.schema.BytesDecimalSchema), shape.name
            assert (avro_type.precision, avro_type.scale) == (DECIMAL_PRECISION, DECIMAL_SCALE)
        elif shape.kind == "timestamp":
            assert isinstance(avro_type, avro.schema.TimestampMicrosSchema), shape.name
        else:
            assert avro_type.type == {"text": "string", "integer": "long"}[shape.kind]


def test_topics_json_matches_each_records_topic_spec() -> None:
    topics = {topic["name"]: topic for topic in read_json("schemas/topics.json")["topics"]}
    assert len(topics) == 2 * len(RECORDS)
    for record_type in RECORDS:
        spec = record_type.topic
        topic = topics[spec.name]
        assert topic["record"] == record_type.__name__
        assert topic["partitions"] == spec.partitions
        assert topic["replication_factor"] == spec.replication_factor
        assert topic["key_field"] == spec.key_field
        retention = spec.retention or timedelta(milliseconds=-1)
        assert topic["config"] == {
            "cleanup.policy": spec.cleanup_policy,
            "retention.ms": str(retention // timedelta(milliseconds=1)),
        }
        dead_letters = topics[f"{spec.name}.dlq"]
        assert dead_letters["partitions"] == spec.partitions
        assert dead_letters["record"] is None


@pytest.mark.slow
def test_topics_script_creates_each_topic_once() -> None:
    script = (ROOT / "schemas/topics.sh").read_text()
    assert os.access(ROOT / "schemas/topics.sh", os.X_OK)
    subprocess.run(["sh", "-n", str(ROOT / "schemas/topics.sh")], check=True)
    creates = [line for line in script.splitlines() if line.startswith("rpk topic create ")]
    topics = read_json("schemas/topics.json")["topics"]
    assert len(creates) == len(topics)
    for topic, line in zip(topics, creates, strict=True):
        words = line.split()
        assert words[3] == topic["name"]
        assert words[words.index("-p") + 1] == str(topic["partitions"])
        assert (
            words[words.index("-r") + 1]
            == f'"${{REPLICATION_FACTOR:-{topic["replication_factor"]}}}"'
        )
        for key, value in topic["config"].items():
            assert f"-c {key}={value}" in line


@pytest.mark.slow
def test_topics_script_alters_existing_topics_instead_of_failing(tmp_path: Path) -> None:
    """Run the script against a stand-in `rpk` whose create fails for a topic that exists."""
    log = tmp_path / "rpk.log"
    rpk = tmp_path / "rpk"
    rpk.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'if [ "$2" = create ] && [ "$3" = crypto-prices ]; then exit 1; fi\n'
    )
    rpk.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "REPLICATION_FACTOR": "5"}
    subprocess.run(["sh", str(ROOT / "schemas/topics.sh")], env=env, check=True)
    calls = log.read_text().splitlines()
    assert calls[0].startswith("topic create crypto-prices -p 6 -r 5 -c cleanup.policy=delete")
    assert calls[1] == (
        "topic alter-config crypto-prices --set cleanup.policy=delete --set retention.ms=604800000"
    )
    assert sum(call.startswith("topic create") for call in calls) == 2 * len(RECORDS)
    assert sum(call.startswith("topic alter-config") for call in calls) == 1


def test_every_generated_file_says_it_is_generated() -> None:
    assert sql.HEADER.startswith(f"-- {GENERATED_BY}")
    files = artifacts()
    assert {path.parts[0] for path in files} == {"sql", "schemas"}
    assert {str(path) for path in files if path.parts[0] == "sql"} == {
        f"sql/{name}" for name in sql.sql_files()
    }
    for path, text in files.items():
        assert text.endswith("\n") and not text.endswith("\n\n"), path
        if path.suffix in (".json", ".avsc"):
            assert json.loads(text)["$comment"] == GENERATED_BY
        else:
            assert GENERATED_BY in text.splitlines()[0 if path.suffix == ".sql" else 1], path


# --- drift ----------------------------------------------------------------------------------


def test_the_repository_files_are_up_to_date() -> None:
    assert check_artifacts(ROOT) == []


def test_check_reports_changed_missing_and_stale_files(tmp_path: Path) -> None:
    copy_generated(tmp_path)
    assert check_artifacts(tmp_path) == []

    (tmp_path / "schemas/avro/CryptoPriceData.avsc").write_text("{}\n")
    (tmp_path / "sql/postgres.sql").unlink()
    (tmp_path / "sql/old_table.sql").write_text(f"-- {GENERATED_BY}\nCREATE TABLE x ();\n")
    (tmp_path / "sql/README.md").write_text("Hand-written notes are not generated files.\n")
    assert check_artifacts(tmp_path) == [
        "schemas/avro/CryptoPriceData.avsc: differs from what the records generate",
        "sql/postgres.sql: missing",
        "sql/old_table.sql: no record generates it any more",
    ]

    changed = write_artifacts(tmp_path)
    assert sorted(changed) == sorted(
        tmp_path / name
        for name in ("schemas/avro/CryptoPriceData.avsc", "sql/postgres.sql", "sql/old_table.sql")
    )
    assert check_artifacts(tmp_path) == []
    assert not (tmp_path / "sql/old_table.sql").exists()
    assert (tmp_path / "sql/README.md").exists()


def test_files_of_a_removed_record_are_stale(tmp_path: Path) -> None:
    retired = type(
        "RetiredRecord",
        (StreamRecord,),
        {
            "__annotations__": {"coin_id": Text, "at": Timestamp, "price": Price},
            "__module__": __name__,
            "topic": TopicSpec("retired", "coin_id", 2, None),
            "table": TableSpec(
                name="retired",
                time_column="at",
                primary_key=("coin_id", "at"),
                chunk_interval=timedelta(days=1),
            ),
        },
    )
    write_artifacts(tmp_path, (*RECORDS, retired))
    assert check_artifacts(tmp_path, (*RECORDS, retired)) == []
    problems = check_artifacts(tmp_path)
    assert "schemas/avro/RetiredRecord.avsc: no record generates it any more" in problems
    assert "schemas/json/RetiredRecord.schema.json: no record generates it any more" in problems
    assert "schemas/topics.json: differs from what the records generate" in problems
    write_artifacts(tmp_path)
    assert check_artifacts(tmp_path) == []
    assert not (tmp_path / "schemas/avro/RetiredRecord.avsc").exists()


def test_generation_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    written = write_artifacts(first)
    assert sorted(written) == sorted(first / relative for relative in artifacts())
    write_artifacts(second)
    assert write_artifacts(first) == []  # a re-run changes nothing
    for relative in artifacts():
        assert (first / relative).read_bytes() == (second / relative).read_bytes()
        assert (first / relative).read_bytes() == (ROOT / relative).read_bytes()


@pytest.mark.slow
def test_schema_check_command_passes_on_the_repository() -> None:
    result = faust_schema("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "generated files are up to date" in result.stdout


@pytest.mark.slow
def test_schema_check_command_fails_on_a_stale_file(tmp_path: Path) -> None:
    copy_generated(tmp_path)
    (tmp_path / "schemas/json/Retired.schema.json").write_text(
        json.dumps({"$comment": GENERATED_BY}) + "\n"
    )
    result = faust_schema("check", "--root", str(tmp_path))
    assert result.returncode != 0
    assert (
        "stale: schemas/json/Retired.schema.json: no record generates it any more" in result.stdout
    )

    generate = faust_schema("generate", "--root", str(tmp_path))
    assert generate.returncode == 0, generate.stderr
    assert "removed schemas/json/Retired.schema.json" in generate.stdout
    assert faust_schema("check", "--root", str(tmp_path)).returncode == 0
