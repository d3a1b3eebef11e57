<?php

declare(strict_types=1);

require_once __DIR__ . '/RecordingTransport.php';

use PerfexWebhooks\Envelope;
use PerfexWebhooks\Outbox;
use PerfexWebhooks\Spool;
use PHPUnit\Framework\TestCase;

/** Batching, the spool while the pipeline is down, order per resource, refusals, the flush lock. */
final class OutboxTest extends TestCase
{
    private HarnessCI $ci;
    private Spool $spool;
    private RecordingTransport $pipeline;

    protected function setUp(): void
    {
        $this->ci = harness_start();
        $this->spool = new Spool($this->ci->db, 'tbl');
        $this->pipeline = new RecordingTransport();
    }

    private function outbox(int $batch = 100): Outbox
    {
        return new Outbox($this->spool, $this->pipeline, $batch, fn (string $m) => log_message('error', $m));
    }

    /** $n events over $resources invoices, each carrying its sequence number. */
    private function events(int $n, int $resources = 3): array
    {
        $out = [];
        for ($i = 0; $i < $n; $i++) {
            $rid = (string) (1 + $i % $resources);
            $out[] = Envelope::build('invoice.updated', $rid, ['id' => $rid, 'seq' => (string) $i]);
        }
        return $out;
    }

    private function request(Outbox $outbox, array $events): void
    {
        foreach ($events as $e) {
            $outbox->queue($e);
        }
        $outbox->deliver();
    }

    private static function seqs(array $items): array
    {
        return array_map(fn ($i) => (int) $i['data']['seq'], $items);
    }

    public function testARequestsEventsLeaveInBatchesInOrder(): void
    {
        $this->request($this->outbox(batch: 4), $this->events(10));
        $this->assertSame([4, 4, 2], array_map('count', $this->pipeline->batches));
        $this->assertSame(range(0, 9), self::seqs($this->pipeline->sent()));
        $this->assertSame(0, $this->spool->size());
    }

    public function testTheSameChangeTwiceInOneRequestIsSentOnce(): void
    {
        $outbox = $this->outbox();
        $e = Envelope::build('task.updated', '3', ['id' => '3']);
        $this->assertTrue($outbox->queue($e));
        $this->assertFalse($outbox->queue(Envelope::build('task.updated', '3', ['id' => '3'])));
        $outbox->deliver();
        $this->assertCount(1, $this->pipeline->sent());
    }

    public function testWhileThePipelineIsDownEventsSpoolAndTheCronFlushesThemInOrder(): void
    {
        $this->pipeline->mode = 'down';
        $outbox = $this->outbox(batch: 7);
        $this->request($outbox, $this->events(5));
        $this->assertSame(5, $this->spool->size());
        $this->assertGreaterThan(time(), $this->spool->pausedUntil());
        $this->assertStringContainsString('unreachable', $this->spool->lastError()['error']);

        // Paused: the next requests go to the spool without trying the pipeline (no waiting).
        $this->pipeline->mode = 'up';
        foreach (array_chunk(array_slice($this->events(20), 5), 5) as $chunk) {
            $this->request($outbox, $chunk);
        }
        $this->assertSame([], $this->pipeline->batches);
        $this->assertSame(20, $this->spool->size());

        $stats = $outbox->flush(5.0); // after_cron_run: regardless of the pause
        $this->assertSame(['sent' => 20, 'refused' => 0, 'left' => 0], array_intersect_key($stats, ['sent' => 0, 'refused' => 0, 'left' => 0]));
        $this->assertSame(range(0, 19), self::seqs($this->pipeline->sent()), 'nothing lost, nothing reordered');
        $this->assertSame([7, 7, 6], array_map('count', $this->pipeline->batches));
        $this->assertSame(0, $this->spool->pausedUntil());
    }

    public function testNewEventsQueueBehindTheSpoolAndTheNextRequestDrainsIt(): void
    {
        $this->pipeline->mode = 'down';
        $outbox = $this->outbox();
        $this->request($outbox, $this->events(3));
        $this->spool->resume(); // the pause is over, the pipeline is back
        $this->pipeline->mode = 'up';
        $this->request($outbox, array_slice($this->events(6), 3));
        $this->assertSame(range(0, 5), self::seqs($this->pipeline->sent()));
        $this->assertSame(0, $this->spool->size());
    }

    public function testEachItemIsAcceptedOrRefusedOnItsOwn(): void
    {
        // The pipeline refuses seq 1 for good (400) and cannot write seq 3 now (503).
        $this->pipeline->mode = fn (array $items) => ['ok' => true, 'status' => 200, 'results' => array_map(
            fn ($i) => match ((int) $i['data']['seq']) {
                1 => ['status' => 400, 'error' => 'unknown_event'],
                3 => ['status' => 503, 'error' => 'Kafka did not acknowledge'],
                default => ['status' => 202],
            },
            $items
        )];
        $outbox = $this->outbox();
        $this->request($outbox, $this->events(5));
        // 0, 2, 4 taken; 1 dropped with a log line; 3 waits in the spool for the next flush.
        $this->assertSame(1, $this->spool->size());
        $this->assertSame([3], self::seqs(array_map(fn ($r) => json_decode($r['body'], true), $this->spool->oldest(10, 1 << 20))));
        $this->assertStringContainsString('refused invoice.updated', implode("\n", harness_log()));

        $this->pipeline->mode = 'up';
        $outbox->flush(1.0);
        $this->assertSame(0, $this->spool->size());
        $this->assertSame([0, 1, 2, 3, 4, 3], self::seqs($this->pipeline->sent()));
    }

    public function testOneFlushAtATime(): void
    {
        $this->spool->push($this->events(2));
        $this->assertTrue($this->spool->lock(60));
        $stats = $this->outbox()->flush(1.0);
        $this->assertTrue($stats['locked']);
        $this->assertSame([], $this->pipeline->batches);
        $this->spool->unlock();
        $this->assertSame(2, $this->outbox()->flush(1.0)['sent']);
    }

    public function testSpoolBatchesAreBoundedInBytes(): void
    {
        $big = str_repeat('x', 400000);
        $this->spool->push([
            Envelope::build('item.updated', '1', ['d' => $big]),
            Envelope::build('item.updated', '2', ['d' => $big]),
            Envelope::build('item.updated', '3', ['d' => $big]),
        ]);
        $this->assertCount(2, $this->spool->oldest(100, Outbox::MAX_BATCH_BYTES));
        $this->outbox()->flush(1.0);
        $this->assertSame([2, 1], array_map('count', $this->pipeline->batches));
    }

    public function testABrokenDatabaseNeverBreaksTheRequest(): void
    {
        $this->pipeline->mode = 'down';
        $outbox = $this->outbox();
        $this->ci->db->broken = true;
        foreach ($this->events(2) as $e) {
            $outbox->queue($e);
        }
        $outbox->deliver(); // must not throw
        $this->assertStringContainsString('lost, spool not writable', implode("\n", harness_log()));
    }
}
