"""Tenant database access: named queries, migrations and tenant-scoped connections."""
