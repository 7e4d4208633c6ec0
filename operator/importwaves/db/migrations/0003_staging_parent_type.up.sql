-- A derived record's parent record type. Needed when a derived type has several parent types
-- whose record ids overlap; NULL means "any parent type" (one parent type, the common case).
ALTER TABLE staging_records ADD COLUMN parent_record_type_id integer;
