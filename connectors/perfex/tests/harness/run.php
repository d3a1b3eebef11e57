<?php

/**
 * Drive the module in the harness from the command line, as one CRM request would:
 *
 *   php run.php scenario.json
 *
 * scenario: {"db": sqlite file (kept between runs, like the CRM's database), "options": {...},
 *            "records": {"invoices_model": {"19": {...}}, ...}, "staff": 1,
 *            "actions": [["after_invoice_added", [19]], ...], "cron": false,
 *            "admin": ["test_event", {"event": "invoice.paid"}]}  (a settings-page action and its POST)
 *
 * The hooks fire, the module queues their events, and when the script ends its shutdown function
 * sends them (or spools them), as at the end of a Perfex request. Prints a JSON report last:
 * {"queued": [{"id", "event", "resource_id"}, ...], "spool": rows left, "alerts": [...], "log": [...]}.
 */

declare(strict_types=1);

require __DIR__ . '/harness.php';

$scenario = json_decode((string) file_get_contents($argv[1] ?? 'php://stdin'), true, 512, JSON_THROW_ON_ERROR);
$ci = harness_start($scenario['db'] ?? ':memory:', $scenario['options'] ?? []);
$GLOBALS['harness']['staff'] = $scenario['staff'] ?? 0;
foreach ($scenario['records'] ?? [] as $model => $records) {
    foreach ($records as $id => $record) {
        $ci->model($model)->records[(string) $id] = $record;
    }
}
foreach ($scenario['actions'] ?? [] as [$hook, $args]) {
    hooks()->do_action($hook, ...$args);
}
$queued = array_map(
    fn (array $e) => ['id' => $e['id'], 'event' => $e['event'], 'resource_id' => $e['resource_id']],
    \PerfexWebhooks\Module::instance()->outbox()->queued()
);
if (!empty($scenario['cron'])) {
    hooks()->do_action('after_cron_run', false);
}
if (!empty($scenario['admin'])) {
    harness_admin($scenario['admin'][0], $scenario['admin'][1] ?? []);
}
// Registered after the module's own shutdown function, so it reports what that one left behind.
register_shutdown_function(static function () use ($queued): void {
    $spool = \PerfexWebhooks\Module::instance()->spool();
    $alerts = $GLOBALS['harness']['alerts'] ?? [];
    echo json_encode(['queued' => $queued, 'spool' => $spool->size(), 'alerts' => $alerts, 'log' => harness_log()]), "\n";
});
