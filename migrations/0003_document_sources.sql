-- Where documents come from: one row per (doc_type, source_name), with ingestion totals.
CREATE TABLE document_sources (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    doc_type     doc_type NOT NULL,
    source_name  varchar(255) NOT NULL,
    version      varchar(50),
    config       jsonb NOT NULL DEFAULT '{}',
    enabled      boolean NOT NULL DEFAULT true,
    last_updated timestamptz,
    total_docs   integer NOT NULL DEFAULT 0,
    total_tokens bigint NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT document_sources_doc_type_source_name_key UNIQUE (doc_type, source_name)
);

CREATE INDEX idx_document_sources_doc_type ON document_sources (doc_type);
CREATE INDEX idx_document_sources_enabled ON document_sources (enabled);
CREATE INDEX idx_document_sources_last_updated ON document_sources (last_updated);

CREATE TRIGGER document_sources_set_updated_at
    BEFORE UPDATE ON document_sources
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
