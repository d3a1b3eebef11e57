<?php

declare(strict_types=1);

use PerfexWebhooks\Transport;

/**
 * The pipeline's side of the wire for unit tests: records each POSTed batch and answers as told
 * (the real HTTP path is covered by the Python end-to-end tests against a real worker).
 */
final class RecordingTransport extends Transport
{
    /** @var list<list<array>> decoded batches, in the order they were sent */
    public array $batches = [];
    /** 'up' (every item 202), 'down' (unreachable), or a callable(list<array> items): array */
    public mixed $mode = 'up';

    public function __construct()
    {
        parent::__construct('http://pipeline.test', 'token');
    }

    public function send(array $bodies): array
    {
        $items = array_map(fn (string $b) => json_decode($b, true, 512, JSON_THROW_ON_ERROR), $bodies);
        if ($this->mode === 'down') {
            return ['ok' => false, 'status' => 0, 'error' => 'pipeline unreachable: connection refused', 'retry' => true];
        }
        $this->batches[] = $items;
        if (is_callable($this->mode)) {
            return ($this->mode)($items);
        }
        return ['ok' => true, 'status' => 200, 'results' => array_map(fn ($i) => ['status' => 202, 'id' => $i['id']], $items)];
    }

    /** @return list<array> every item the pipeline accepted or was offered, in order */
    public function sent(): array
    {
        return array_merge(...($this->batches ?: [[]]));
    }
}
