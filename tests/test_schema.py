"""The Doc Server's migrations and the pgvector-aware schema checks."""

from __future__ import annotations

import json

import psycopg2.extensions
import pytest

import pgops
from pgops import Migrator, check_schema
from pgtest import ROOT, run_pgops

MIGRATIONS = ROOT / "migrations"


@pytest.fixture
def doc_server(dsn: str, pgvector: None) -> str:
    """The test's database with the repository's migrations applied."""
    Migrator(dsn, str(MIGRATIONS)).migrate()
    return dsn


def spec() -> dict[str, object]:
    """Return the expectations shipped beside the migrations."""
    loaded = pgops._load_schema_spec(str(MIGRATIONS))
    assert loaded is not None
    return loaded


def test_repository_migrations_create_a_3072_dimension_embedding(
    doc_server: str, admin: psycopg2.extensions.connection
) -> None:
    """The shipped migrations apply to a fresh database and documents.embedding is vector(3072)."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'documents'::regclass AND attname = 'embedding'"
        )
        assert cur.fetchone() == ("vector(3072)",)
        cur.execute("SELECT enum_range(NULL::doc_type)::text")
        row = cur.fetchone()
        assert row is not None and "rust_best_practices" in row[0]


def test_shipped_spec_passes_on_the_shipped_migrations(
    doc_server: str, admin: psycopg2.extensions.connection
) -> None:
    """check_schema with the repository's spec finds no problem, and notes the index limit."""
    report = check_schema(admin, **spec())  # type: ignore[arg-type]
    assert report.ok, report.problems
    assert "vector" in report.extensions
    assert any("at most 2000 dimensions" in note for note in report.notes)


def test_updated_at_trigger(doc_server: str, admin: psycopg2.extensions.connection) -> None:
    """Updating a document moves its updated_at forward."""
    with admin.cursor() as cur:
        cur.execute(
            "INSERT INTO documents (doc_type, source_name, doc_path, content, created_at, updated_at) "
            "VALUES ('rust', 'book', 'ch1.md', 'x', now() - interval '1 day', now() - interval '1 day') "
            "RETURNING id"
        )
        row = cur.fetchone()
        assert row is not None
        cur.execute("UPDATE documents SET content = 'y' WHERE id = %s RETURNING updated_at > created_at", row)
        assert cur.fetchone() == (True,)


def test_dimension_mismatch_names_both_numbers(vector_admin: psycopg2.extensions.connection) -> None:
    """A vector(1536) column where vector(3072) is expected is reported with both dimensions."""
    with vector_admin.cursor() as cur:
        cur.execute("CREATE TABLE documents (embedding vector(1536))")
    report = check_schema(vector_admin, columns={"documents.embedding": "vector(3072)"})
    assert not report.ok
    (problem,) = report.problems
    assert "1536" in problem and "3072" in problem and "documents.embedding" in problem


def test_missing_things_are_reported_with_a_remedy(admin: psycopg2.extensions.connection) -> None:
    """A missing extension, table, column and index each give one problem saying what to do."""
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE documents (id int)")
    report = check_schema(
        admin,
        extensions=["vector"],
        tables=["documents", "document_sources"],
        columns={"documents.content": "text", "documents.id": "bigint"},
        indexes=["idx_documents_doc_type"],
    )
    problems = "\n".join(report.problems)
    assert len(report.problems) == 5
    assert "extension 'vector' is not installed" in problems and "CREATE EXTENSION vector" in problems
    assert "table 'document_sources' does not exist" in problems
    assert "column 'documents.content' does not exist" in problems
    assert "column 'documents.id' is integer but bigint is expected" in problems
    assert "index 'idx_documents_doc_type' does not exist" in problems


def test_type_aliases_match(admin: psycopg2.extensions.connection) -> None:
    """varchar(n), timestamptz, int and bool match the server's spelling of those types."""
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE t (a varchar(255), b timestamptz, c int, d bool)")
    columns = {"t.a": "varchar(255)", "t.b": "timestamptz", "t.c": "int", "t.d": "bool"}
    assert check_schema(admin, columns=columns).ok


def test_index_limit_is_a_problem_when_an_ann_index_is_required(
    vector_admin: psycopg2.extensions.connection,
) -> None:
    """Asking for an ANN-indexable vector(3072) reports the 2000-dimension limit and the remedy."""
    with vector_admin.cursor() as cur:
        cur.execute("CREATE TABLE docs (embedding vector(3072), small vector(384))")
    report = check_schema(
        vector_admin,
        columns={"docs.embedding": "vector(3072)", "docs.small": "vector(384)"},
        ann=["docs.embedding", "docs.small"],
    )
    (problem,) = report.problems
    assert "docs.embedding" in problem and "at most 2000 dimensions" in problem and "halfvec(3072)" in problem
    version = report.extensions["vector"]
    if tuple(int(x) for x in version.split(".")[:2]) < (0, 7):
        assert f"upgrade pgvector to 0.7 or later (installed: {version})" in problem


def test_validate_checks_the_schema_spec(doc_server: str, admin: psycopg2.extensions.connection) -> None:
    """`pgops validate` on the repository's migrations checks schema.json and fails (4) on a mismatch."""
    ok = run_pgops("validate", "--dir", str(MIGRATIONS), database_url=doc_server)
    assert ok.returncode == 0, ok.stderr
    assert "schema as expected" in ok.stdout
    with admin.cursor() as cur:
        cur.execute("DROP INDEX idx_documents_doc_type")
    bad = run_pgops("validate", "--dir", str(MIGRATIONS), database_url=doc_server)
    assert bad.returncode == 4
    assert "idx_documents_doc_type" in bad.stderr and "Traceback" not in bad.stderr


def test_spec_file_is_valid_json_with_known_keys() -> None:
    """The shipped schema.json parses and uses only keys check_schema knows."""
    data = json.loads((MIGRATIONS / "schema.json").read_text())
    assert set(data) <= {"comment", "extensions", "tables", "columns", "indexes", "ann"}
    assert data["columns"]["documents.embedding"] == "vector(3072)"
