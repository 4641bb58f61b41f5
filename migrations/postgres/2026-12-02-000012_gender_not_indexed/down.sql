-- The rows cannot be rebuilt in SQL (they are keyed hashes): run `carevault keys reindex` after reverting.
SELECT 1;
