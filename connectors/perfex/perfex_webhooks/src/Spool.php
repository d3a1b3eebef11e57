<?php

declare(strict_types=1);

namespace PerfexWebhooks;

defined('BASEPATH') or exit('No direct script access allowed');

/**
 * The local spool: events the pipeline has not taken yet, in a module table (created on activation),
 * read back oldest first so each resource's events leave in the order they happened.
 *
 * Only CodeIgniter 3 query-builder calls on `$CI->db`; the same table holds the module's small
 * state (a flush lock, when to try the pipeline again, the last error) in `..._state`.
 */
final class Spool
{
    private object $db;
    private string $table;
    private string $stateTable;

    public function __construct(object $db, string $prefix)
    {
        $this->db = $db;
        $this->table = $prefix . 'perfex_webhooks_spool';
        $this->stateTable = $prefix . 'perfex_webhooks_state';
    }

    /** @param list<array> $envelopes in order */
    public function push(array $envelopes): void
    {
        foreach ($envelopes as $envelope) {
            $this->pushEncoded(
                Envelope::encode($envelope),
                (string) $envelope['event'],
                (string) $envelope['resource_id'],
                (string) $envelope['id']
            );
        }
    }

    public function pushEncoded(string $body, string $event, string $resourceId, string $eventId): void
    {
        $this->db->insert($this->table, [
            'event_id' => $eventId,
            'event' => $event,
            'resource_id' => $resourceId,
            'body' => $body,
            'created_at' => gmdate('Y-m-d H:i:s'),
            'attempts' => 0,
        ]);
    }

    /**
     * The oldest rows, at most $limit of them and about $maxBytes of bodies (always at least one).
     *
     * @return list<array{id: string, event: string, resource_id: string, body: string}>
     */
    public function oldest(int $limit, int $maxBytes): array
    {
        $rows = $this->db->select('id, event, resource_id, body')
            ->order_by('id', 'ASC')
            ->limit($limit)
            ->get($this->table)
            ->result_array();
        $out = [];
        $bytes = 0;
        foreach ($rows as $row) {
            $bytes += strlen($row['body']) + 1;
            if ($out !== [] && $bytes > $maxBytes) {
                break;
            }
            $out[] = $row;
        }
        return $out;
    }

    /** @param list<int|string> $ids */
    public function remove(array $ids): void
    {
        if ($ids !== []) {
            $this->db->where_in('id', $ids)->delete($this->table);
        }
    }

    /** @param list<int|string> $ids */
    public function failed(array $ids, string $error): void
    {
        if ($ids !== []) {
            $this->db->set('attempts', 'attempts + 1', false)
                ->set('last_error', mb_substr($error, 0, 250))
                ->where_in('id', $ids)
                ->update($this->table);
        }
    }

    public function size(): int
    {
        return (int) $this->db->count_all_results($this->table);
    }

    // ---- state: a lock so one flush runs at a time, and when to try the pipeline again ----------------
    /** Take the flush lock for $seconds unless another request holds it. */
    public function lock(int $seconds): bool
    {
        $now = time();
        $this->db->where('name', 'flush_lock')->where('until_ts <', $now)->update($this->stateTable, ['until_ts' => $now + $seconds]);
        return $this->db->affected_rows() > 0;
    }

    public function unlock(): void
    {
        $this->db->where('name', 'flush_lock')->update($this->stateTable, ['until_ts' => 0]);
    }

    public function pausedUntil(): int
    {
        return (int) ($this->state('paused')['until_ts'] ?? 0);
    }

    public function pause(int $seconds, string $error): void
    {
        $this->db->where('name', 'paused')->update($this->stateTable, ['until_ts' => time() + $seconds, 'note' => mb_substr($error, 0, 250)]);
    }

    public function resume(): void
    {
        $this->db->where('name', 'paused')->update($this->stateTable, ['until_ts' => 0]);
    }

    /** The last error the pipeline gave and when (unix time), for the settings page. */
    public function lastError(): array
    {
        $row = $this->state('last_error');
        return ['at' => (int) ($row['until_ts'] ?? 0), 'error' => (string) ($row['note'] ?? '')];
    }

    public function noteError(string $error): void
    {
        $this->db->where('name', 'last_error')->update($this->stateTable, ['until_ts' => time(), 'note' => mb_substr($error, 0, 250)]);
    }

    private function state(string $name): ?array
    {
        $row = $this->db->where('name', $name)->get($this->stateTable)->row_array();
        return is_array($row) ? $row : null;
    }
}
