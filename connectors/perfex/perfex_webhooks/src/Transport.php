<?php

declare(strict_types=1);

namespace PerfexWebhooks;

defined('BASEPATH') or exit('No direct script access allowed');

/**
 * One POST of a batch to the pipeline's ingest (`POST /api/events` with a JSON array), with a short
 * timeout: a CRM request waits at most that long for us.
 */
class Transport
{
    public function __construct(
        private string $url,
        private string $token,
        private int $timeoutMs = 3000,
        private int $connectTimeoutMs = 1000
    ) {
    }

    /** The ingest URL: a base address gets `/api/events` appended. */
    public static function ingestUrl(string $url): string
    {
        $url = trim($url);
        $path = (string) parse_url($url, PHP_URL_PATH);
        return ($path === '' || $path === '/') ? rtrim($url, '/') . '/api/events' : $url;
    }

    /**
     * POST `[item, item, ...]` (already-encoded envelopes). Returns one result per item on a 200:
     * ['ok' => true, 'results' => [['status' => 202|400|413|503, 'error' => ..], ...]],
     * otherwise ['ok' => false, 'error' => why, 'status' => HTTP status or 0, 'retry' => bool].
     *
     * @param list<string> $bodies
     */
    public function send(array $bodies): array
    {
        if ($this->url === '') {
            return ['ok' => false, 'status' => 0, 'error' => 'no ingest URL configured', 'retry' => true];
        }
        $ch = curl_init(self::ingestUrl($this->url));
        curl_setopt_array($ch, [
            CURLOPT_POST => true,
            CURLOPT_POSTFIELDS => '[' . implode(',', $bodies) . ']',
            CURLOPT_HTTPHEADER => [
                'Content-Type: application/json',
                'Authorization: Bearer ' . $this->token,
                'User-Agent: perfex-webhooks-module/' . Module::VERSION,
            ],
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_CONNECTTIMEOUT_MS => $this->connectTimeoutMs,
            CURLOPT_TIMEOUT_MS => $this->timeoutMs,
            CURLOPT_FOLLOWLOCATION => false,
            CURLOPT_NOSIGNAL => true,
        ]);
        $raw = curl_exec($ch);
        $status = (int) curl_getinfo($ch, CURLINFO_RESPONSE_CODE);
        $curlError = curl_error($ch);
        curl_close($ch);
        if ($raw === false) {
            return ['ok' => false, 'status' => 0, 'error' => 'pipeline unreachable: ' . $curlError, 'retry' => true];
        }
        $doc = json_decode((string) $raw, true);
        if ($status === 200 && is_array($doc) && isset($doc['results']) && is_array($doc['results'])
            && count($doc['results']) === count($bodies)) {
            return ['ok' => true, 'status' => 200, 'results' => $doc['results']];
        }
        $why = is_array($doc) && isset($doc['error']) ? (string) $doc['error'] : substr((string) $raw, 0, 200);
        // 4xx on the whole request (bad token, body too large) is ours to fix, not the events' fault:
        // they stay in the spool either way; nothing is dropped for a request-level answer.
        return ['ok' => false, 'status' => $status, 'error' => "pipeline answered $status: $why", 'retry' => true];
    }
}
