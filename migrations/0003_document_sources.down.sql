DROP TABLE document_sources;
