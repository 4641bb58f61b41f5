DROP TABLE care_relationships;
DROP TABLE search_index;
DROP TABLE resource_history;
DROP TABLE resources;
