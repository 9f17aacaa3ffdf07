-- Identities are scoped. A user is a tenant and a user id (the same id in two tenants is
-- two people), and a send's idempotency key is (tenant, sender, conversation,
-- client_msg_id): the same client_msg_id in another conversation is another message.
-- (Before this, the key was (sender, client_msg_id): a send to conversation B reusing an
-- id from conversation A was answered as A's duplicate and B's message was lost.)

ALTER TABLE messages ADD COLUMN IF NOT EXISTS tenant TEXT;
UPDATE messages m SET tenant = c.tenant
  FROM conversations c WHERE c.id = m.conversation_id AND m.tenant IS NULL;
ALTER TABLE messages ALTER COLUMN tenant SET NOT NULL;
ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_sender_id_client_msg_id_key;
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency_key
  ON messages (tenant, sender_id, conversation_id, client_msg_id);

-- A conversation belongs to one tenant and so do its members; the column makes every
-- membership check name the tenant it means.
ALTER TABLE conversation_members ADD COLUMN IF NOT EXISTS tenant TEXT;
UPDATE conversation_members m SET tenant = c.tenant
  FROM conversations c WHERE c.id = m.conversation_id AND m.tenant IS NULL;
ALTER TABLE conversation_members ALTER COLUMN tenant SET NOT NULL;
DROP INDEX IF EXISTS conversation_members_by_user;
CREATE INDEX IF NOT EXISTS conversation_members_by_user
  ON conversation_members (tenant, user_id);
