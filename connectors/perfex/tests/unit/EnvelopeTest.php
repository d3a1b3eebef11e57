<?php

declare(strict_types=1);

use PerfexWebhooks\Envelope;
use PHPUnit\Framework\TestCase;

final class EnvelopeTest extends TestCase
{
    public function testTheEnvelopeHasTheSpecFieldsAndPerfexStyleStrings(): void
    {
        $record = (object) ['id' => 19, 'total' => 21.8, 'paid' => true, 'note' => null, 'client' => (object) ['userid' => 3]];
        $e = Envelope::build('invoice.paid', '19', (array) $record, ['status' => 3]);
        $this->assertMatchesRegularExpression('/^evt_[A-Za-z0-9_-]{22}$/', $e['id']);
        $this->assertSame('invoice.paid', $e['event']);
        $this->assertMatchesRegularExpression('/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/', $e['occurred_at']);
        $this->assertSame('19', $e['resource_id']);
        $this->assertSame(['id' => '19', 'total' => '21.8', 'paid' => '1', 'note' => null, 'client' => ['userid' => '3']], $e['data']);
        $this->assertSame(['status' => '3'], $e['previous']);
        $this->assertNotSame($e['id'], Envelope::build('invoice.paid', '19', [])['id']);
    }

    public function testNoPreviousWhenNothingChanged(): void
    {
        $this->assertArrayNotHasKey('previous', Envelope::build('lead.updated', '1', ['id' => '1'], []));
        $this->assertArrayNotHasKey('previous', Envelope::build('lead.updated', '1', ['id' => '1']));
    }

    public function testEncodingIsCompactUtf8WithObjectsForEmptyData(): void
    {
        $json = Envelope::encode(Envelope::build('item.deleted', '4', [], null, 'evt_x', '2026-11-27T10:00:00.123Z'));
        $this->assertSame('{"id":"evt_x","event":"item.deleted","occurred_at":"2026-11-27T10:00:00.123Z","resource_id":"4","data":{}}', $json);
        $json = Envelope::encode(Envelope::build('item.updated', '4', ['d' => 'Zürich/€ <b>'], null, 'evt_y', '2026-11-27T10:00:00.123Z'));
        $this->assertStringContainsString('"data":{"d":"Zürich/€ <b>"}', $json);
    }

    public function testChangedKeepsTheOldValuesOfChangedFieldsOnly(): void
    {
        $old = ['id' => '1', 'status' => '1', 'total' => '10.00', 'items' => [1], 'gone' => 'x'];
        $new = ['id' => '1', 'status' => 2, 'total' => '10.00', 'items' => [2]];
        $this->assertSame(['status' => '1'], Envelope::changed($old, $new));
    }
}
