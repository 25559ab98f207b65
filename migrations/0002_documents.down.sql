DROP TABLE documents;
DROP FUNCTION set_updated_at();
DROP TYPE doc_type;
