"""perfex-webhooks: Perfex CRM change events on Kafka turned into signed, reliable webhook deliveries."""

__version__ = "0.1.0"
