-- Patient.gender has four values: even blind-indexed, equal hashes would show every patient's class by counting
-- (docs/encryption.md). It is no longer indexed; searches on it decrypt and filter the candidates.
DELETE FROM search_index WHERE resource_type = 'Patient' AND param = 'gender';
