-- The documents the Doc Server serves, one row per (doc_type, source_name, doc_path), with a
-- 3072-dimension embedding (OpenAI text-embedding-3-large).
--
-- No approximate-nearest-neighbour index on embedding: pgvector's HNSW and IVFFlat support at most
-- 2000 dimensions for the vector type, so CREATE INDEX ... USING hnsw (embedding vector_cosine_ops)
-- fails for vector(3072). Exact search (ORDER BY embedding <=> $1) works without one. When it gets
-- too slow, either index a half-precision expression (pgvector >= 0.7, up to 4000 dimensions):
--     CREATE INDEX CONCURRENTLY documents_embedding_hnsw
--         ON documents USING hnsw ((embedding::halfvec(3072)) halfvec_cosine_ops);
--     -- and query with ORDER BY embedding::halfvec(3072) <=> $1::halfvec(3072)
-- or store a reduced-dimension copy (text-embedding-3 models accept dimensions=1536) and index that.

CREATE TYPE doc_type AS ENUM (
    'rust', 'jupyter', 'birdeye', 'cilium', 'talos', 'meteora', 'raydium', 'solana', 'ebpf',
    'rust_best_practices'
);

CREATE TABLE documents (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    doc_type    doc_type NOT NULL,
    source_name varchar(255) NOT NULL,
    doc_path    text NOT NULL,
    content     text NOT NULL,
    metadata    jsonb NOT NULL DEFAULT '{}',
    embedding   vector(3072),
    token_count integer,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT documents_doc_type_source_name_doc_path_key UNIQUE (doc_type, source_name, doc_path)
);

CREATE INDEX idx_documents_doc_type ON documents (doc_type);
CREATE INDEX idx_documents_source_name ON documents (source_name);
CREATE INDEX idx_documents_created_at ON documents (created_at);
CREATE INDEX idx_documents_updated_at ON documents (updated_at);

-- One trigger function keeps updated_at honest for every table that has the column.
CREATE FUNCTION set_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER documents_set_updated_at
    BEFORE UPDATE ON documents
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
