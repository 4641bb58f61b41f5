DROP INDEX resources_index_version;
ALTER TABLE resources DROP COLUMN index_version;
