-- The blind-index key version the search_index rows of each current resource were computed with, so that
-- `keys reindex` can rebuild them batch by batch after an index-key rotation and resume after a crash.
ALTER TABLE resources ADD COLUMN index_version INTEGER NOT NULL DEFAULT 1;
CREATE INDEX resources_index_version ON resources (index_version);
