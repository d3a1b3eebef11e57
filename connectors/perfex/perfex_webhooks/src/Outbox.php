<?php

declare(strict_types=1);

namespace PerfexWebhooks;

defined('BASEPATH') or exit('No direct script access allowed');

/**
 * The events of one CRM request, sent in batches when the request ends; the spool when that fails.
 *
 * Order per resource: once anything waits in the spool, new events queue behind it and leave with
 * the next flush, oldest first. While the pipeline is known to be down (a failed send pauses direct
 * sends for PAUSE_SECONDS), requests write to the spool without trying, so a CRM save is never
 * slowed by an outage more than once per pause. `after_cron_run` flushes regardless of the pause.
 */
final class Outbox
{
    /** Bytes of events per request: under the pipeline's default body limit (1 000 000). */
    public const MAX_BATCH_BYTES = 900000;
    public const PAUSE_SECONDS = 30;
    public const LOCK_SECONDS = 120;

    /** @var list<array> */
    private array $queue = [];
    /** @var array<string, true> */
    private array $seen = [];
    /** @var callable(string): void */
    private $log;

    public function __construct(
        private Spool $spool,
        private Transport $transport,
        private int $batchSize = 100,
        ?callable $log = null
    ) {
        $this->batchSize = max(1, min(500, $batchSize));
        $this->log = $log ?? static function (string $message): void {
        };
    }

    /** Queue an event of this request; true for the first one (the caller then arranges delivery). */
    public function queue(array $envelope): bool
    {
        // A hook may fire twice in one request for the same change (controller and model): send it once.
        $same = hash('sha256', json_encode([$envelope['event'], $envelope['resource_id'], $envelope['data'], $envelope['previous'] ?? null]));
        if (isset($this->seen[$same])) {
            return false;
        }
        $this->seen[$same] = true;
        $this->queue[] = $envelope;
        return count($this->queue) === 1;
    }

    /** @return list<array> */
    public function queued(): array
    {
        return $this->queue;
    }

    /** The queued events, handed over and no longer queued (a caller that sends them itself). */
    public function take(): array
    {
        [$events, $this->queue, $this->seen] = [$this->queue, [], []];
        return $events;
    }

    /** Send this request's events (called once, when the request ends). Never throws. */
    public function deliver(): void
    {
        $events = $this->queue;
        $this->queue = [];
        $this->seen = [];
        if ($events === []) {
            return;
        }
        $unsent = $events;
        try {
            if ($this->spool->pausedUntil() > time() || $this->spool->size() > 0) {
                $this->spool->push($events);
                $unsent = [];
                if ($this->spool->pausedUntil() <= time()) {
                    $this->flush(0.0); // one batch: the spool drains with each request and each cron run
                }
                return;
            }
            foreach ($this->chunks($events) as $chunk) {
                $result = $this->transport->send(array_map([Envelope::class, 'encode'], $chunk));
                if (!$result['ok']) {
                    $this->spool->push($unsent);
                    $unsent = [];
                    $this->down($result['error']);
                    return;
                }
                $retry = [];
                foreach ($chunk as $i => $envelope) {
                    $status = (int) ($result['results'][$i]['status'] ?? 0);
                    if (!self::accepted($status) && !self::refused($status)) {
                        $retry[] = $envelope;
                    } elseif (self::refused($status)) {
                        $this->refusedLog($envelope['event'], $envelope['id'], $result['results'][$i]);
                    }
                }
                array_splice($unsent, 0, count($chunk));
                if ($retry !== []) {
                    // Kafka did not take some: they and everything after them wait in the spool.
                    $this->spool->push([...$retry, ...$unsent]);
                    $unsent = [];
                    $this->down('the pipeline did not acknowledge ' . count($retry) . ' event(s)');
                    return;
                }
            }
        } catch (\Throwable $e) {
            ($this->log)('perfex_webhooks: delivering events failed: ' . $e->getMessage());
            try {
                if ($unsent !== []) {
                    $this->spool->push($unsent);
                }
            } catch (\Throwable $e2) {
                ($this->log)('perfex_webhooks: ' . count($unsent) . ' event(s) lost, spool not writable: ' . $e2->getMessage());
            }
        }
    }

    /**
     * Send what waits in the spool, oldest first, batch after batch for up to $seconds (at least one
     * batch). Returns counts: sent, refused, left, and whether another flush held the lock.
     */
    public function flush(float $seconds): array
    {
        $stats = ['sent' => 0, 'refused' => 0, 'left' => 0, 'locked' => false, 'error' => null];
        if (!$this->spool->lock(self::LOCK_SECONDS)) {
            $stats['locked'] = true;
            return $stats;
        }
        try {
            $deadline = microtime(true) + $seconds;
            do {
                $rows = $this->spool->oldest($this->batchSize, self::MAX_BATCH_BYTES);
                if ($rows === []) {
                    $this->spool->resume();
                    break;
                }
                $result = $this->transport->send(array_column($rows, 'body'));
                $ids = array_column($rows, 'id');
                if (!$result['ok']) {
                    $this->spool->failed($ids, $result['error']);
                    $this->down($result['error']);
                    $stats['error'] = $result['error'];
                    break;
                }
                $done = [];
                $retry = [];
                foreach ($rows as $i => $row) {
                    $status = (int) ($result['results'][$i]['status'] ?? 0);
                    if (self::accepted($status)) {
                        $done[] = $row['id'];
                        $stats['sent']++;
                    } elseif (self::refused($status)) {
                        $done[] = $row['id'];
                        $stats['refused']++;
                        $this->refusedLog($row['event'], (string) $row['id'], $result['results'][$i]);
                    } else {
                        $retry[] = $row['id'];
                    }
                }
                $this->spool->remove($done);
                if ($retry !== []) {
                    $this->spool->failed($retry, 'not acknowledged by the pipeline');
                    $this->down('the pipeline did not acknowledge ' . count($retry) . ' event(s)');
                    $stats['error'] = 'not acknowledged';
                    break;
                }
                $this->spool->resume();
            } while (microtime(true) < $deadline);
        } finally {
            $this->spool->unlock();
        }
        $stats['left'] = $this->spool->size();
        return $stats;
    }

    /** Send events now, not through the spool (the settings page's test event). */
    public function sendNow(array $envelopes): array
    {
        return $this->transport->send(array_map([Envelope::class, 'encode'], $envelopes));
    }

    /** @return list<list<array>> consecutive chunks bounded by count and bytes */
    private function chunks(array $events): array
    {
        $chunks = [];
        $chunk = [];
        $bytes = 0;
        foreach ($events as $event) {
            $size = strlen(Envelope::encode($event)) + 1;
            if ($chunk !== [] && (count($chunk) >= $this->batchSize || $bytes + $size > self::MAX_BATCH_BYTES)) {
                $chunks[] = $chunk;
                $chunk = [];
                $bytes = 0;
            }
            $chunk[] = $event;
            $bytes += $size;
        }
        if ($chunk !== []) {
            $chunks[] = $chunk;
        }
        return $chunks;
    }

    private function down(string $error): void
    {
        $this->spool->pause(self::PAUSE_SECONDS, $error);
        $this->spool->noteError($error);
        ($this->log)('perfex_webhooks: ' . $error . '; events wait in the spool');
    }

    private function refusedLog(string $event, string $id, array $result): void
    {
        $why = (string) ($result['error'] ?? 'refused');
        $this->spool->noteError("$event $id refused: $why");
        ($this->log)("perfex_webhooks: the pipeline refused $event ($id): $why");
    }

    private static function accepted(int $status): bool
    {
        return $status >= 200 && $status < 300;
    }

    /** Refused for good (bad input): sending it again cannot succeed. 429 and 5xx are retried. */
    private static function refused(int $status): bool
    {
        return $status >= 400 && $status < 500 && $status !== 429 && $status !== 408;
    }
}
