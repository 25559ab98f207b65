-- pgvector stores the embeddings. gen_random_uuid() is core PostgreSQL (13+): no uuid-ossp needed.
CREATE EXTENSION IF NOT EXISTS vector;
